"""Real TensorRT builds (GPU only): engines, engines.json, parser errors, int8 calibration."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from compir.engines import detect_device, load_engines
from compir.errors import ContractError
from compir.manifest import load_manifest, manifest_sha256
from tests.gpu import require_tensorrt_gpu

pytestmark = pytest.mark.gpu


@pytest.fixture()
def export_copy(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    require_tensorrt_gpu()
    copy = tmp_path / "export"
    shutil.copytree(request.getfixturevalue("tiny_export_all"), copy)
    return copy


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_build_record_and_match_onnx(export_copy: Path, precision: str) -> None:
    from compir.export.trt.engine_build import BuildOptions, build_engines
    from compir.runtime.backends.tensorrt import TensorRTBackend

    cache = export_copy.parent / "timing.cache"
    options = BuildOptions(precision=precision, min_batch=1, opt_batch=4, max_batch=16, workspace_gb=1.0, timing_cache=cache)
    engines = build_engines(export_copy, options=options)
    assert cache.is_file() and cache.stat().st_size > 0
    loaded = load_engines(export_copy / "engines", manifest_sha256=manifest_sha256(export_copy), device=detect_device())
    assert loaded == engines and set(loaded.engines) == {"image_encoder", "text_encoder", "composer", "query_encoder"}
    record = loaded.engine("image_encoder")
    assert record.precision == precision and record.profile["pixel_values"].max[0] == 16
    assert record.onnx_sha256 == load_manifest(export_copy).graph("image_encoder").sha256

    import onnxruntime as ort

    manifest = load_manifest(export_copy)
    graph = manifest.graph("image_encoder")
    pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    session = TensorRTBackend(export_copy).open(graph)
    trt_embeds = session.run({"pixel_values": pixels})["image_embeds"]
    reference = ort.InferenceSession(str(export_copy / graph.file), providers=["CPUExecutionProvider"])
    (ort_embeds,) = reference.run(["image_embeds"], {"pixel_values": pixels})
    cosine = np.sum(trt_embeds * ort_embeds, axis=1)
    # fp32 engines clear TF32 (precision_flags), so they match onnxruntime's fp32 CPU run to ~1e-6.
    assert cosine.min() > (0.99999 if precision == "fp32" else 0.999)
    # The text engine takes 1 to context tokens: the runtime runs texts cut after the longest.
    tokens = loaded.engine("text_encoder").profile["input_ids"]
    assert (tokens.min[1], tokens.max[1]) == (1, manifest.tokenizer.context_length)
    from compir.runtime.encoder import Encoder

    texts = ["red", "make the big red cube small and blue"]
    trt_text = Encoder.from_export(export_copy, backend="tensorrt").encode_texts(texts).text_embeds
    ort_text = Encoder.from_export(export_copy, providers=["cpu"]).encode_texts(texts).text_embeds
    assert np.sum(trt_text * ort_text, axis=1).min() > (0.99999 if precision == "fp32" else 0.999)
    # A second build reuses the timing cache.
    build_engines(export_copy, options=options, roles=["composer"], out_dir=export_copy.parent / "again")


def test_int8_engines_from_calibration(export_copy: Path, synth_data: Path) -> None:
    pytest.importorskip("torch.cuda")
    from compir.export.trt.engine_build import BuildOptions, build_engines

    engines = build_engines(
        export_copy, options=BuildOptions(precision="int8", max_batch=16), calibration_data=synth_data, calibration_count=16
    )
    assert engines.precision == "int8" and engines.variant == "fp32"
    explicit = build_engines(
        export_copy, options=BuildOptions(precision="int8", max_batch=16), variant="int8-static", out_dir=export_copy / "engines-qdq"
    )
    assert explicit.variant == "int8-static"


def test_parser_errors_are_all_reported(export_copy: Path) -> None:
    from compir.engines import ShapeRange
    from compir.export.trt.engine_build import BuildOptions, build_engine

    broken = export_copy / "broken.onnx"
    broken.write_bytes((export_copy / "fp32" / "composer.onnx").read_bytes()[:200])
    profile = {"image_features": ShapeRange(min=(1, 64), opt=(1, 64), max=(1, 64))}
    with pytest.raises(ContractError, match=r"TensorRT cannot parse .*broken.onnx \(\d+ error"):
        build_engine(broken, profile=profile, options=BuildOptions(precision="fp32"))


def test_int8_dynamic_variant_is_refused(export_copy: Path) -> None:
    from compir.export.trt.engine_build import BuildOptions, build_engines

    with pytest.raises(ContractError, match="cannot build the int8-dynamic variant"):
        build_engines(export_copy, options=BuildOptions(precision="int8"), variant="int8-dynamic")
