"""TensorRT-independent engine logic: profiles from manifest shapes, calibration inputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from compir.engines import ShapeRange
from compir.errors import ContractError
from compir.export.samples import load_samples
from compir.export.trt.calibrator import calibration_digest, calibration_feeds, check_batches, split_batches
from compir.export.trt.profiles import calibration_batch, calibration_shapes, compute_profile, token_range
from compir.manifest import TensorSpec, load_manifest
from compir.runtime.tokenizer import load_tokenizer


def test_profile_covers_every_input_of_every_graph(tiny_export_all: Path) -> None:
    manifest = load_manifest(tiny_export_all)
    assert token_range(77) == (1, 20, 77) and token_range(manifest.tokenizer.context_length) == (1, 16, 16)
    query = compute_profile(manifest.graph("query_encoder"), min_batch=1, opt_batch=8, max_batch=32, tokens=(1, 12, 16))
    assert query == {
        "pixel_values": ShapeRange(min=(1, 3, 32, 32), opt=(8, 3, 32, 32), max=(32, 3, 32, 32)),
        "input_ids": ShapeRange(min=(1, 1), opt=(8, 12), max=(32, 16)),  # texts cut after the longest: 1 to 16 tokens
    }
    composer = compute_profile(manifest.graph("composer"), min_batch=2, opt_batch=2, max_batch=4)
    features = manifest.graph("image_encoder").output("image_features").shape
    assert composer["image_features"] == ShapeRange(min=(2, *features[1:]), opt=(2, *features[1:]), max=(4, *features[1:]))
    assert calibration_shapes(query, batch=8) == {"pixel_values": (8, 3, 32, 32), "input_ids": (8, 16)}
    assert calibration_shapes(query, batch=100)["input_ids"] == (32, 16)


def test_profile_refuses_what_it_cannot_size(tiny_export_all: Path) -> None:
    graph = load_manifest(tiny_export_all).graph("text_encoder")
    with pytest.raises(ContractError, match=r"1 <= min \(4\) <= opt \(2\)"):
        compute_profile(graph, min_batch=4, opt_batch=2, max_batch=8)
    other_axis = replace(graph, inputs=(TensorSpec(name="input_ids", dtype="int64", shape=("batch", "sequence")),))
    with pytest.raises(ContractError, match="input 'input_ids' axis 1 is dynamic \\('sequence'\\)"):
        compute_profile(other_axis, min_batch=1, opt_batch=1, max_batch=1)  # no token range given
    other_axis = replace(graph, inputs=(TensorSpec(name="input_ids", dtype="int64", shape=("batch", "words")),))
    with pytest.raises(ContractError, match="input 'input_ids' axis 1 is dynamic \\('words'\\)"):
        compute_profile(other_axis, min_batch=1, opt_batch=1, max_batch=1, tokens=(1, 2, 3))


def test_calibration_feeds_are_real_and_batched(tiny_export_all: Path, synth_data: Path) -> None:
    manifest = load_manifest(tiny_export_all)
    tokenizer = load_tokenizer(tiny_export_all, manifest.tokenizer)
    samples = load_samples(preprocess=manifest.preprocess, tokenizer=tokenizer, data_dir=synth_data, count=20)
    assert len(set(samples.image_names)) == 20 and all(t.strip() for t in samples.texts)
    graphs = {role: tiny_export_all / g.file for role, g in manifest.variant("fp32").graphs.items()}
    feeds = calibration_feeds(graphs, samples, roles=["composer", "query_encoder"])
    assert sorted(feeds["composer"]) == ["image_features", "text_features"]
    assert feeds["composer"]["image_features"].shape[0] == 20 and np.isfinite(feeds["composer"]["image_features"]).all()
    batches = split_batches(feeds["query_encoder"], batch=8)
    assert [b["input_ids"].shape for b in batches] == [(8, 16), (8, 16)]  # the tail of 4 is dropped
    with pytest.raises(ContractError, match="at least 32 samples"):
        split_batches(feeds["query_encoder"], batch=32)


def test_samples_from_an_image_folder_and_rendered(tmp_path: Path, tiny_export_all: Path) -> None:
    from PIL import Image

    manifest = load_manifest(tiny_export_all)
    tokenizer = load_tokenizer(tiny_export_all, manifest.tokenizer)
    for index in range(3):
        Image.new("RGB", (40 + index, 30), (index * 80, 20, 200)).save(tmp_path / f"photo{index}.jpg")
    folder = load_samples(preprocess=manifest.preprocess, tokenizer=tokenizer, data_dir=tmp_path, count=8)
    assert folder.pixel_values.shape == (3, 3, 32, 32) and folder.input_ids.shape == (3, 16)
    rendered = load_samples(preprocess=manifest.preprocess, tokenizer=tokenizer, count=4)
    assert rendered.source == "rendered synthetic scenes" and rendered.pixel_values.shape == (4, 3, 32, 32)
    assert (rendered.input_ids[:, 0] == manifest.tokenizer.sot_id).all()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ContractError, match="holds no dataset and no images"):
        load_samples(preprocess=manifest.preprocess, tokenizer=tokenizer, data_dir=empty)


def test_calibration_batch_matches_the_calibration_profile() -> None:
    assert calibration_batch(8, min_batch=1, max_batch=64) == 8
    assert calibration_batch(8, min_batch=1, max_batch=4) == 4  # TensorRT would read 4 rows of 8
    assert calibration_batch(8, min_batch=16, max_batch=64) == 16  # and 16 rows of 8: out of bounds
    profile = {"input_ids": ShapeRange(min=(16, 16), opt=(32, 16), max=(64, 16))}
    assert calibration_shapes(profile, batch=calibration_batch(8, min_batch=16, max_batch=64)) == {"input_ids": (16, 16)}


def test_calibration_batches_are_checked_and_the_cache_is_keyed_by_graph_and_data(tmp_path: Path) -> None:
    ids = np.arange(32, dtype=np.int64).reshape(2, 16)
    check_batches([{"input_ids": ids}], inputs=["input_ids"], batch=2)
    with pytest.raises(ContractError, match="calibration profile runs batch 4"):
        check_batches([{"input_ids": ids}], inputs=["input_ids"], batch=4)
    with pytest.raises(ContractError, match=r"has inputs \['input_ids'\], the network has \['input_ids', 'pixel_values'\]"):
        check_batches([{"input_ids": ids}], inputs=["pixel_values", "input_ids"], batch=2)
    graph = tmp_path / "text_encoder.onnx"
    graph.write_bytes(b"graph one")
    first = calibration_digest(graph, [{"input_ids": ids}])
    assert first == calibration_digest(graph, [{"input_ids": ids.copy()}])
    assert first != calibration_digest(graph, [{"input_ids": ids + 1}])
    graph.write_bytes(b"graph two (retrained)")
    assert first != calibration_digest(graph, [{"input_ids": ids}])


@pytest.mark.parametrize(
    ("variant", "precision", "refused"),
    [
        ("fp32", "fp32", None),
        ("fp32", "fp16", None),
        ("fp32", "int8", None),  # calibrated from the fp32 graphs
        ("fp16", "fp16", None),
        ("int8-static", "int8", None),  # explicit quantization
        ("int8-static", "fp16", "builds only at --precision int8"),
        ("int8-dynamic", "int8", "cannot build the int8-dynamic variant"),
    ],
)
def test_variant_and_precision_combinations(variant: str, precision: str, refused: str | None) -> None:
    from compir.export.trt.engine_build import _check_variant

    if refused is None:
        _check_variant(variant, precision)
    else:
        with pytest.raises(ContractError, match=refused):
            _check_variant(variant, precision)


@pytest.mark.parametrize(
    ("precision", "enable", "disable"),
    [
        ("fp32", (), ("TF32",)),  # strict fp32: TensorRT turns TF32 on by default (Ampere, Orin, Hopper)
        ("fp16", ("FP16",), ()),
        ("int8", ("FP16", "INT8"), ()),  # layers without an int8 kernel fall back to fp16
    ],
)
def test_precision_builder_flags(precision: str, enable: tuple[str, ...], disable: tuple[str, ...]) -> None:
    from compir.export.trt.engine_build import PrecisionFlags, precision_flags

    assert precision_flags(precision) == PrecisionFlags(enable=enable, disable=disable)


def test_unknown_precision_is_refused() -> None:
    from compir.export.trt.engine_build import precision_flags

    with pytest.raises(ContractError, match="unknown precision 'bf16'"):
        precision_flags("bf16")
