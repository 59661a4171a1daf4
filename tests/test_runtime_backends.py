"""Backends: onnxruntime provider order and reporting; native TensorRT engines and the CUDA EP on GPUs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from compir.errors import ContractError
from compir.runtime.backends.ort import DEFAULT_PROVIDERS, resolve_providers
from compir.runtime.encoder import Encoder
from compir.runtime.retriever import Retriever


def test_provider_order_keeps_only_available_ones() -> None:
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    assert resolve_providers(None) == [p for p in DEFAULT_PROVIDERS if p in available]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["tensorrt", "cuda", "cpu"])[-1] == "CPUExecutionProvider"
    with pytest.raises(ContractError, match="none of the providers"):
        resolve_providers(["NoSuchExecutionProvider"])


def test_variants_agree_and_report_what_they_run_on(tiny_export: Path) -> None:
    reference = Encoder.from_export(tiny_export, providers=["cpu"])
    variants = sorted(reference.manifest.variants)
    images = np.random.default_rng(0).normal(size=(4, 3, reference.manifest.preprocess.image_size, reference.manifest.preprocess.image_size)).astype(np.float32)
    base = reference.encode_pixels(images).image_embeds
    for variant in variants:
        encoder = Encoder.from_export(tiny_export, providers=["cpu"], variant=variant)
        info = encoder.backend_info()
        assert info["variant"] == variant and info["providers"]["image_encoder"] == ["CPUExecutionProvider"]
        embeds = encoder.encode_pixels(images).image_embeds
        cosine = (embeds * base).sum(axis=1)
        assert embeds.dtype == np.float32 and cosine.min() > 0.9, (variant, cosine)
    with pytest.raises(ContractError, match="no 'fp64' variant"):
        Encoder.from_export(tiny_export, variant="fp64")


def _ort_hits(tiny_export: Path, tiny_index: Path) -> list[list[str]]:
    retriever = Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])
    ids = retriever.item_ids()[:5]
    return [[h.item_id for h in retriever.search(reference=item, text="make it red", k=5)] for item in ids]


@pytest.mark.gpu
def test_cuda_execution_provider_matches_cpu(tiny_export: Path, tiny_index: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here (install onnxruntime-gpu on a GPU machine)")
    gpu = Retriever.from_dirs(tiny_export, tiny_index, providers=["cuda", "cpu"])
    assert gpu.backend_info["providers"]["image_encoder"][0] == "CUDAExecutionProvider"
    ids = gpu.item_ids()[:5]
    hits = [[h.item_id for h in gpu.search(reference=item, text="make it red", k=5)] for item in ids]
    assert [h[:3] for h in hits] == [h[:3] for h in _ort_hits(tiny_export, tiny_index)]


@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime(tiny_export: Path, tiny_index: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU machines only)")
    from compir.export.cli import main as export_main

    export_dir = tmp_path / "export"
    shutil.copytree(tiny_export, export_dir)
    assert export_main(["engine", str(export_dir), "--precision", "fp32", "--max-batch", "16"]) == 0
    index_dir = tmp_path / "index"
    shutil.copytree(tiny_index, index_dir)
    ort = Encoder.from_export(export_dir, providers=["cpu"])
    trt = Encoder.from_export(export_dir, backend="tensorrt")
    assert trt.backend_info()["backend"] == "tensorrt"
    size = ort.manifest.preprocess.image_size
    pixels = np.random.default_rng(1).normal(size=(3, 3, size, size)).astype(np.float32)
    np.testing.assert_allclose(trt.encode_pixels(pixels).image_embeds, ort.encode_pixels(pixels).image_embeds, atol=2e-3)
    ids = ort.tokenize(["make it red", "a blue square"])
    np.testing.assert_allclose(trt.encode_input_ids(ids).text_embeds, ort.encode_input_ids(ids).text_embeds, atol=2e-3)
    retriever = Retriever(trt, Retriever.from_dirs(export_dir, index_dir, providers=["cpu"]).gallery)
    item = retriever.item_ids()[0]
    assert retriever.search(reference=item, text="make it red", k=3)
