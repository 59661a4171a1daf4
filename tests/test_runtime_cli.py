"""``compir index build``, ``compir search`` and export-folder evaluation, through their main()."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compir.cli import main as compir_main
from compir.runtime.evaluation import encode_split_for_export
from compir.runtime.gallery import Gallery
from compir.runtime.index_cli import main as index_main
from compir.runtime.search_cli import main as search_main


def test_index_build_reports_unreadable_images(
    tiny_export: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    sources = sorted((synth_data / "images").glob("*.png"))[:20]
    (images / "nested").mkdir(parents=True)
    for path in sources[:15]:
        shutil.copy(path, images / path.name)
    for path in sources[15:]:
        shutil.copy(path, images / "nested" / path.name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "index"
    argv = [str(tiny_export), "--images", str(images), "--out", str(out), "--dtype", "i8", "--batch-size", "4", "--workers", "3",
            "--copy-images", "--quiet", "--expansion-search", "300"]
    assert index_main(["build", *argv]) == 0
    captured = capsys.readouterr()
    assert "indexed 20 images" in captured.out and "skipped 2 (unreadable, or no valid item id)" in captured.out
    assert "broken.png" in captured.err and "empty.jpg" in captured.err
    gallery = Gallery.load(out, encoder=None)
    assert len(gallery) == 20 and gallery.vectors.dtype == "i8"
    assert gallery.vectors.hnsw.expansion_search == 300  # saved in index.json, read back
    assert f"nested/{sources[16].stem}" in gallery and sources[0].stem in gallery
    copied = gallery.image_path(sources[0].stem)
    assert copied is not None and out in copied.parents and copied.read_bytes() == sources[0].read_bytes()
    # An existing index is never silently replaced.
    assert compir_main(["index", "build", *argv]) == 2
    assert "already exists" in capsys.readouterr().err


def test_search_cli_prints_hits_and_timings(tiny_export: Path, tiny_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    item = Gallery.load(tiny_index, encoder=None).ids[0]
    argv = [str(tiny_export), str(tiny_index), "--text", "make it red", "-k", "4", "--json"]
    assert search_main([*argv, "--reference-id", item, "--timings"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["hits"]) == 4 and item not in [h["item_id"] for h in record["hits"]]
    # Warm figures of a query that ran once untimed, every stage run for real (no text cache).
    assert set(record["timings_ms"]) == {"tokenize", "text_encode", "compose", "search"} and record["timings"].startswith("warm")
    assert search_main([str(tiny_export), str(tiny_index), "--text", "a red circle", "-k", "2", "--timings"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("  1") and lines[2].startswith("warm timings") and "text_encode" in lines[2]
    assert compir_main(["search", str(tiny_export), str(tiny_index), "--reference-id", "nope", "--text", "x"]) == 2
    assert "reference_id 'nope': no such item in the gallery" in capsys.readouterr().err
    # An id is never read as a path, nor a path as an id.
    assert compir_main(["search", str(tiny_export), str(tiny_index), "--reference-image", item, "--text", "x"]) == 2
    assert f"reference_image {item!r} is not a file" in capsys.readouterr().err
    image = Gallery.load(tiny_index, encoder=None).image_path(item)
    everything = [str(tiny_export), str(tiny_index), "--text", "make it red", "-k", "100000", "--json"]  # k clamps to the gallery
    assert search_main([*everything, "--reference-image", str(image)]) == 0
    hits = [h["item_id"] for h in json.loads(capsys.readouterr().out)["hits"]]
    assert item in hits and len(hits) == len(Gallery.load(tiny_index, encoder=None))  # an upload does not exclude the item
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --reference-image
        search_main([str(tiny_export), str(tiny_index), "--reference-image", str(image), "--reference-id", item, "--text", "x"])
    assert compir_main(["search", str(tiny_export), str(tiny_index), "--text", "x", "-k", "0"]) == 2


def test_encode_split_for_export_agrees_with_the_retriever(tiny_export: Path, tiny_index: Path, synth_data: Path) -> None:
    from compir.data.load import load_split
    from compir.metrics import evaluate_split
    from compir.runtime.retriever import Retriever

    split = load_split(synth_data, split="val")
    queries, gallery, names = encode_split_for_export(tiny_export, split, batch_size=32)
    assert queries.shape == (len(split.queries), gallery.shape[1]) and gallery.shape[0] == len(names) == len(split.gallery)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-4)
    retriever = Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])
    query = split.queries[0]
    single = retriever.encoder.compose(
        retriever.gallery.features[retriever.gallery.row(query.reference)][None],
        retriever.encoder.encode_texts([query.text]).text_features,
    )
    np.testing.assert_allclose(queries[0], single[0], atol=1e-5)
    report = evaluate_split(split, query_embeds=queries, gallery_embeds=gallery, gallery_names=names)
    assert report.n_queries == len(split.queries) and "R@1" in report.metrics


def test_runtime_options_are_shared_and_accept_both_provider_spellings():
    import argparse

    from compir.runtime.cli_args import add_runtime_args, providers_from

    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    assert providers_from(parser.parse_args(["--providers", "cuda,cpu"])) == ["cuda", "cpu"]
    assert providers_from(parser.parse_args(["--providers", "cuda", "cpu"])) == ["cuda", "cpu"]
    assert providers_from(parser.parse_args([])) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "tflite"])
