"""Big graphs: ONNX external data, forced on a small model with a zero threshold, end to end through
the runtime; what an export folder holds by default (no fused graph)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from compir.errors import ContractError
from compir.export.external_data import external_files
from compir.manifest import GRAPH_ROLES, load_manifest
from compir.runtime.encoder import Encoder

EXTERNAL_VARIANTS = ("fp32", "fp16", "int8-dynamic", "int8-static")


@pytest.fixture(scope="module")
def external_export(micro_checkpoint: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``micro_checkpoint`` exported through the CLI with every graph's weights in external data."""
    from compir.cli import main as compir_main

    out = tmp_path_factory.mktemp("export-external") / "micro"
    args = ["export", "onnx", str(micro_checkpoint), "--out", str(out), "--variants", ",".join(EXTERNAL_VARIANTS),
            "--calibration-data", str(synth_data), "--calibration-count", "4", "--external-data-mb", "0"]
    assert compir_main(args) == 0
    return out


def test_every_graph_keeps_its_weights_in_one_checksummed_data_file(external_export: Path) -> None:
    manifest = load_manifest(external_export)  # verifies every checksum, external data included
    assert sorted(manifest.variants) == sorted(EXTERNAL_VARIANTS)
    for variant in manifest.variants.values():
        assert sorted(variant.graphs) == ["composer", "image_encoder", "text_encoder"]
        for graph in variant.graphs.values():
            assert [d.file for d in graph.external_data] == [f"{graph.file}.data"]
            structure = onnx.load(str(external_export / graph.file), load_external_data=False)
            assert external_files(structure) == [Path(graph.file).name + ".data"]
            assert (external_export / graph.file).stat().st_size < (external_export / graph.external_data[0].file).stat().st_size
            assert graph.content_sha256 != graph.sha256
    assert "int8-dynamic" in manifest.variants and min(manifest.variant("int8-dynamic").parity.values()) >= 0.95


def test_runtime_loads_external_data_and_computes_what_the_inline_export_computes(
    external_export: Path, micro_export: Path, tmp_path: Path
) -> None:
    """The same checkpoint exported inline (``micro_export``) and with external data, moved
    elsewhere (the data files travel with the folder): every variant's runtime outputs agree."""
    moved = tmp_path / "moved"
    shutil.copytree(external_export, moved)
    inline = Encoder.from_export(micro_export, providers=["cpu"])
    size = inline.manifest.preprocess.image_size
    pixels = np.random.default_rng(0).random((3, 3, size, size), dtype=np.float32)
    texts = ["make it red", "a bigger one", "remove the circle"]
    expected_image = inline.encode_pixels(pixels).image_embeds
    expected_query = inline.compose(inline.encode_pixels(pixels).image_features, inline.encode_texts(texts).text_features)
    for variant in EXTERNAL_VARIANTS:
        encoder = Encoder.from_export(moved, providers=["cpu"], variant=variant)
        image = encoder.encode_pixels(pixels)
        query = encoder.compose(image.image_features, encoder.encode_texts(texts).text_features)
        tolerance = 1e-5 if variant == "fp32" else 0.1
        assert np.max(np.abs(image.image_embeds - expected_image)) <= tolerance, variant
        assert np.max(np.abs(query - expected_query)) <= tolerance, variant
        if variant != "fp32":
            cosine = np.sum(query * expected_query, axis=1)
            assert float(cosine.min()) >= 0.95, variant


def test_damaged_or_missing_external_data_is_named(external_export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(external_export, copy)
    data = copy / "fp16" / "text_encoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-64])  # an interrupted copy
    with pytest.raises(ContractError, match=r"fp16 text_encoder graph's external data: .*text_encoder.onnx.data is damaged"):
        Encoder.from_export(copy, providers=["cpu"], variant="fp16")
    data.unlink()
    with pytest.raises(ContractError, match=r"fp16 text_encoder graph's external data: file .*text_encoder.onnx.data is missing"):
        load_manifest(copy)


def test_default_export_holds_the_split_graphs_only(micro_export: Path) -> None:
    """No fused query_encoder unless asked for (it is as big as the model), no external data for small graphs."""
    manifest = load_manifest(micro_export)
    graphs = manifest.variant("fp32").graphs
    assert sorted(graphs) == ["composer", "image_encoder", "text_encoder"] and "query_encoder" in GRAPH_ROLES
    assert all(not graph.external_data for graph in graphs.values())
    assert sorted(p.name for p in (micro_export / "fp32").iterdir()) == ["composer.onnx", "image_encoder.onnx", "text_encoder.onnx"]


def test_negative_external_data_threshold_is_refused(micro_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compir.cli import main as compir_main

    assert compir_main(["export", "onnx", str(micro_checkpoint), "--out", str(tmp_path / "x"), "--external-data-mb", "-1"]) == 2
    assert "--external-data-mb must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_int8_calibration_cache_is_keyed_by_the_external_weights_too(external_export: Path, tmp_path: Path) -> None:
    """TensorRT trusts a calibration cache: new weights in the data file must not reuse the old one."""
    from compir.export.trt.calibrator import calibration_digest

    for name in ("composer.onnx", "composer.onnx.data"):
        shutil.copyfile(external_export / "fp32" / name, tmp_path / name)
    batches = [{"image_features": np.zeros((2, 4), np.float32)}]
    before = calibration_digest(tmp_path / "composer.onnx", batches)
    data = tmp_path / "composer.onnx.data"
    data.write_bytes(data.read_bytes()[::-1])
    assert calibration_digest(tmp_path / "composer.onnx", batches) != before
