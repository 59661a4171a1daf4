"""fp16 / int8 variants: what their graphs contain, that they load at onnxruntime's default
optimisation level, and the accuracy cost recorded for each."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest

from compir.manifest import load_manifest

_PROBE = """
import sys
import numpy as np
import onnxruntime as ort
from compir.manifest import load_manifest
folder = sys.argv[1]
manifest = load_manifest(folder)
for graph in manifest.variant(sys.argv[2]).graphs.values():
    session = ort.InferenceSession(f"{folder}/{graph.file}", providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in graph.inputs:
        shape = [3] + list(spec.shape[1:])
        feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
    outputs = session.run(None, feeds)
    assert all(np.isfinite(o).all() for o in outputs), graph.role
print("ok")
"""


def op_counts(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("variant", ["fp16", "int8-dynamic", "int8-static"])
def test_variant_loads_and_runs_at_default_session_level(tiny_export_all: Path, variant: str) -> None:
    # A subprocess: onnxruntime 1.2x's NchwcTransformer segfaulted on fp16 transformer graphs,
    # which would kill the test run instead of failing one test.
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tiny_export_all), variant], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_variants_keep_fp32_io_and_change_the_weights(tiny_export_all: Path) -> None:
    manifest = load_manifest(tiny_export_all)
    fp32 = manifest.variant("fp32")
    for name in ("fp16", "int8-dynamic", "int8-static"):
        variant = manifest.variant(name)
        for role, graph in variant.graphs.items():
            assert graph.inputs == fp32.graph(role).inputs and graph.outputs == fp32.graph(role).outputs, (name, role)
            assert graph.sha256 != fp32.graph(role).sha256
    image = "fp32/image_encoder.onnx"
    fp16_ops = op_counts(tiny_export_all / "fp16/image_encoder.onnx")
    assert fp16_ops["Cast"] > op_counts(tiny_export_all / image)["Cast"]
    fp16_model = onnx.load(str(tiny_export_all / "fp16/image_encoder.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in fp16_model.graph.initializer)
    assert op_counts(tiny_export_all / "int8-dynamic/image_encoder.onnx")["MatMulInteger"] > 0
    static_ops = op_counts(tiny_export_all / "int8-static/image_encoder.onnx")
    assert static_ops["QuantizeLinear"] > 0 and static_ops["DequantizeLinear"] > 0
    fp32_size = (tiny_export_all / image).stat().st_size
    for name in ("int8-dynamic", "int8-static"):
        assert (tiny_export_all / name / "image_encoder.onnx").stat().st_size < 0.5 * fp32_size


def test_accuracy_cost_is_recorded_per_variant(tiny_export_all: Path) -> None:
    manifest = load_manifest(tiny_export_all)
    fp32 = manifest.variant("fp32").accuracy
    assert fp32["n_queries"] == 160 and fp32["recall_at_10_drop"] == 0.0 and fp32["mean_cosine_to_fp32"] == pytest.approx(1.0)
    assert fp32["R@10"] >= 50.0  # a trained model, so recall drops are measured on real margins
    for name in ("fp16", "int8-dynamic", "int8-static"):
        variant = manifest.variant(name)
        figures = variant.accuracy
        for key in ("R@1", "R@10", "R@50", "Rs@1"):
            assert figures[f"{key}_drop"] == pytest.approx(fp32[key] - figures[key]), (name, key)
        assert figures["recall_at_10_drop"] == figures["R@10_drop"]
        assert abs(figures["recall_at_10_drop"]) <= 2.5, (name, figures["recall_at_10_drop"])  # 4 of 160 queries
        assert 0.99 <= figures["mean_cosine_to_fp32"] <= 1.0 + 1e-9
        assert 0.99 <= figures["gallery_cosine_to_fp32"] <= 1.0 + 1e-9
        assert set(variant.parity) == set(variant.graphs) and min(variant.parity.values()) >= 0.99
    assert manifest.variant("fp16").accuracy["mean_cosine_to_fp32"] > 0.9999
