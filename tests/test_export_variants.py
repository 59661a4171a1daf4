"""fp16 / int8 variants: what their graphs contain, that they load at onnxruntime's default
optimisation level, and the accuracy cost recorded for each."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compir.export.variants import INT8_DYNAMIC_RECIPE, INT8_STATIC_RECIPE, INT8_STATIC_U8_RECIPE
from compir.manifest import load_manifest

_PROBE = """
import sys
import numpy as np
import onnxruntime as ort
from compir.export.variants import INT8_DYNAMIC_RECIPE, INT8_STATIC_RECIPE
from compir.manifest import load_manifest
folder = sys.argv[1]
manifest = load_manifest(folder)
for graph in manifest.variant(sys.argv[2]).graphs.values():
    session = ort.InferenceSession(f"{folder}/{graph.file}", providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in graph.inputs:
        shape = [3] + [dim if isinstance(dim, int) else 5 for dim in spec.shape[1:]]  # 5 tokens on a dynamic sequence axis
        feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
    outputs = session.run(None, feeds)
    assert all(np.isfinite(o).all() for o in outputs), graph.role
print("ok")
"""


def op_counts(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("variant", ["fp16", "int8-dynamic", "int8-static", "int8-static-u8"])
def test_variant_loads_and_runs_at_default_session_level(tiny_export_all: Path, variant: str) -> None:
    # A subprocess: onnxruntime 1.2x's NchwcTransformer segfaulted on fp16 transformer graphs,
    # which would kill the test run instead of failing one test.
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tiny_export_all), variant], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_variants_keep_fp32_io_and_change_the_weights(tiny_export_all: Path) -> None:
    manifest = load_manifest(tiny_export_all)
    fp32 = manifest.variant("fp32")
    for name in ("fp16", "int8-dynamic", "int8-static", "int8-static-u8"):
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
    for name in ("int8-dynamic", "int8-static", "int8-static-u8"):
        assert (tiny_export_all / name / "image_encoder.onnx").stat().st_size < 0.5 * fp32_size


def test_accuracy_cost_is_recorded_per_variant(tiny_export_all: Path) -> None:
    manifest = load_manifest(tiny_export_all)
    fp32 = manifest.variant("fp32").accuracy
    assert fp32["n_queries"] == 160 and fp32["recall_at_10_drop"] == 0.0 and fp32["mean_cosine_to_fp32"] == pytest.approx(1.0)
    assert fp32["R@10"] >= 50.0  # a trained model, so recall drops are measured on real margins
    for name in ("fp16", "int8-dynamic", "int8-static", "int8-static-u8"):
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
    # How each variant was made is recorded; the int8 recipes compute the same on AVX2 and VNNI CPUs
    # (test_int8_weights_cannot_saturate_avx2_kernels), so these thresholds hold on both classes.
    assert manifest.variant("fp32").quantization == {} and manifest.variant("fp16").quantization == {}
    assert manifest.variant("int8-dynamic").quantization["recipe"] == INT8_DYNAMIC_RECIPE["recipe"]
    assert manifest.variant("int8-static").quantization["recipe"] == INT8_STATIC_RECIPE["recipe"]
    assert manifest.variant("int8-static-u8").quantization["recipe"] == INT8_STATIC_U8_RECIPE["recipe"]


def test_recorded_accuracy_is_what_the_runtime_scores(tiny_export_all: Path, synth_data: Path) -> None:
    # The manifest's recall is measured through the runtime (numpy preprocessing, its tokenizer, the
    # split graphs), so `compir eval EXPORT --variant V` reproduces it exactly.
    from compir.evaluate import evaluate_path

    manifest = load_manifest(tiny_export_all)
    for name in ("fp32", "int8-dynamic"):
        result = evaluate_path(tiny_export_all, data=synth_data, split="test", variant=name, batch_size=64, progress=False)
        report = result.reports["composed"]
        for key, value in report.metrics.items():
            assert manifest.variant(name).accuracy[key] == pytest.approx(value, abs=1e-9), (name, key)


@pytest.mark.parametrize("role", ["image_encoder", "text_encoder"])
def test_int8_static_u8_runs_as_integer_kernels_in_onnxruntime(tiny_export_all: Path, role: str, tmp_path: Path) -> None:
    # What makes int8-static-u8 the CPU's int8 for convolution towers: onnxruntime's QDQ fusion turns
    # every quantized Conv / MatMul / Gemm into an integer kernel, none is left as DequantizeLinear
    # + float op (the s8 int8-static left a third of ResNet-50's convolutions so).
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # QDQ fusion, no layout-specific ops
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tiny_export_all / "int8-static-u8" / f"{role}.onnx"), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    dequantized = {output for node in graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    float_ops = [node.name for node in graph.node if node.op_type in ("Conv", "MatMul", "Gemm") and dequantized & set(node.input)]
    assert not float_ops, float_ops
    integer_ops = Counter(node.op_type for node in graph.node if node.op_type.startswith(("QLinear", "QGemm")))
    assert integer_ops["QLinearMatMul"] + integer_ops["QGemm"] > 0, integer_ops


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("role", ["image_encoder", "text_encoder", "composer", "query_encoder"])
def test_int8_static_is_symmetric_qdq_that_tensorrt_parses(tiny_export_all: Path, role: str) -> None:
    # TensorRT's QuantizeLinear / DequantizeLinear take only int8 with zero zero-points (onnx-tensorrt's
    # operator docs); asymmetric uint8 activations made the graph unparsable.
    path = tiny_export_all / "int8-static" / f"{role}.onnx"
    model = onnx.load(str(path))
    values = _initializers(path)
    qdq = [node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, role
    for node in qdq:
        assert len(node.input) == 3 and node.input[2] in values, (node.name, "zero point must be an explicit initializer")
        zero_point = values[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), (node.name, zero_point.dtype, zero_point)
    assert not [node.op_type for node in model.graph.node if node.op_type in ("DynamicQuantizeLinear", "QLinearMatMul", "MatMulInteger")]


@pytest.mark.parametrize("variant", ["int8-dynamic", "int8-static", "int8-static-u8"])
def test_int8_weights_cannot_saturate_avx2_kernels(tiny_export_all: Path, variant: str) -> None:
    # Without VNNI, onnxruntime's x86-64 int8 kernels add pairs of u8 activation x s8 weight products
    # in int16 with saturation; with 7-bit weights (reduce_range) 2 * 255 * 64 = 32,640 fits, so the
    # variant computes the same on AVX2 as on VNNI machines.
    manifest = load_manifest(tiny_export_all)
    recipe = manifest.variant(variant).quantization
    assert recipe["reduce_range"] is True and recipe["recipe"] and recipe["weight_type"] == "QInt8"
    for graph in manifest.variant(variant).graphs.values():
        values = _initializers(tiny_export_all / graph.file).values()
        int8_weights = [value for value in values if value.dtype == np.int8 and value.size > 1]
        assert int8_weights, graph.role
        assert max(int(np.abs(value.astype(np.int32)).max()) for value in int8_weights) <= 64, graph.role
        assert 2 * 255 * 64 <= np.iinfo(np.int16).max



@pytest.mark.parametrize("variant", ["int8-static", "int8-static-u8"])
def test_static_int8_keeps_activation_matmuls_fp32(tiny_export_all: Path, variant: str) -> None:
    # A MatMul of two activations (attention, TG-CIR's token learner) has no 7-bit weight side: fused
    # into QLinearMatMul, AVX2's int16 pair sums saturate on its full-range int8 inputs (the ResNet
    # family's image encoder fell to cosine 0.905 on an AVX2 EPYC). Both its inputs stay fp32.
    for role in ("image_encoder", "text_encoder"):
        model = onnx.load(str(tiny_export_all / variant / f"{role}.onnx"))
        dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
        activation_matmuls = [node for node in model.graph.node if node.op_type == "MatMul" and not _weight_side(node, model)]
        assert activation_matmuls, (role, "the graph has attention matmuls")
        for node in activation_matmuls:
            assert not set(node.input) & dequantized, (role, node.name, "quantized")


def _weight_side(node: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    """Whether the MatMul's second input is a (dequantized) constant weight."""
    producers = {out: n for n in model.graph.node for out in n.output}
    constants = {init.name for init in model.graph.initializer}
    source = producers.get(node.input[1])
    return node.input[1] in constants or (source is not None and source.op_type == "DequantizeLinear" and source.input[0] in constants)


def test_quantizing_leaves_nothing_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's symbolic shape inference fails on the text graph's dynamic sequence axis and then
    leaves a <uuid>.data copy of its weights in the working directory; the export runs it elsewhere."""
    import torch

    from compir.export.to_onnx import export_onnx
    from compir.train.checkpoint import save_checkpoint
    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    torch.manual_seed(0)
    checkpoint = tmp_path / "ck.pt"
    save_checkpoint(checkpoint, model=CIRModel(resolve_model_config("micro")), metrics={}, step=0, epoch=0)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    export_onnx(Path("../ck.pt"), out_dir=Path("../export"), variants=("fp32", "int8-dynamic", "int8-static-u8"), calibration_count=2)
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert (tmp_path / "export" / "int8-dynamic" / "text_encoder.onnx").is_file()
