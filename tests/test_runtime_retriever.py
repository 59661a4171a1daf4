"""The Retriever on the session's tiny export and index: real onnxruntime sessions, real usearch."""

from __future__ import annotations

import io
import itertools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from compir.errors import DuplicateItemError, InputError
from compir.manifest import QUERY_ENCODER, load_manifest
from compir.runtime import rerank
from compir.runtime.retriever import Retriever
from compir.runtime.types import STAGES, AddResult, Hit


@pytest.fixture(scope="module")
def retriever(tiny_export: Path, tiny_index: Path) -> Retriever:
    return Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])


@pytest.fixture()
def writable(tiny_export: Path, tiny_index: Path, tmp_path: Path) -> Retriever:
    """A retriever over a private copy of the index (tests that change the gallery)."""
    shutil.copytree(tiny_index, tmp_path / "index")
    return Retriever.from_dirs(tiny_export, tmp_path / "index", providers=["cpu"])


def _fused_query(export_dir: Path, image_path: Path, text: str, retriever: Retriever) -> np.ndarray:
    """The query vector from the export's fused query_encoder graph: an independent path."""
    import onnxruntime

    graph = load_manifest(export_dir).graph(QUERY_ENCODER)
    session = onnxruntime.InferenceSession(str(export_dir / graph.file), providers=["CPUExecutionProvider"])
    from compir.images import load_image

    pixels = retriever.encoder.preprocess([load_image(image_path)])
    ids = retriever.encoder.tokenize([text])
    return session.run(["query_embeds"], {"pixel_values": pixels, "input_ids": ids})[0]


def _ranking(retriever: Retriever, query: np.ndarray, *, skip: str | None = None) -> list[str]:
    embeds = np.asarray(retriever.gallery.vectors.embeds)
    order = np.argsort(-(embeds @ query.reshape(-1)), kind="stable")
    return [retriever.gallery.ids[i] for i in order if retriever.gallery.ids[i] != skip]


def test_composed_search_matches_the_fused_graph_and_brute_force(retriever: Retriever, tiny_export: Path) -> None:
    item = retriever.item_ids()[3]
    path = retriever.item_image_path(item)
    assert path is not None and path.is_file()
    text = "make the circle red"
    hits = retriever.search(reference_id=item, text=text, k=10)
    assert len(hits) == 10 and all(isinstance(h, Hit) for h in hits)
    assert item not in [h.item_id for h in hits]  # a gallery reference is never its own answer
    expected = _ranking(retriever, _fused_query(tiny_export, path, text, retriever), skip=item)
    assert [h.item_id for h in hits][:5] == expected[:5]
    assert all(a.score >= b.score - 1e-6 for a, b in itertools.pairwise(hits))


def test_every_reference_form_gives_the_same_query(retriever: Retriever) -> None:
    item = retriever.item_ids()[5]
    path = retriever.item_image_path(item)
    assert path is not None
    text = "remove the square"
    by_path = retriever.search(reference_image=path, text=text, k=8)
    by_str = retriever.search(reference_image=str(path), text=text, k=8)
    by_bytes = retriever.search(reference_image=path.read_bytes(), text=text, k=8)
    by_image = retriever.search(reference_image=Image.open(path), text=text, k=8)
    assert by_path == by_str == by_bytes == by_image
    by_id = retriever.search(reference_id=item, text=text, k=7)
    without_self = [h for h in by_path if h.item_id != item][:7]
    assert [h.item_id for h in by_id] == [h.item_id for h in without_self]
    np.testing.assert_allclose([h.score for h in by_id], [h.score for h in without_self], atol=1e-5)


def test_text_only_search_ranks_by_text_embeds(retriever: Retriever) -> None:
    text = "a large blue triangle"
    hits = retriever.search(text=text, k=5)
    query = retriever.encoder.encode_texts([text]).text_embeds
    assert [h.item_id for h in hits] == _ranking(retriever, query)[:5]


def test_search_batch_equals_single_searches(retriever: Retriever) -> None:
    ids = retriever.item_ids()
    queries: list[dict[str, Any]] = [
        {"reference_id": ids[0], "text": "make it green"},
        {"reference_image": None, "reference_id": None, "text": "a small red circle"},
        {"reference_image": retriever.item_image_path(ids[1]), "text": "add a triangle"},
        {"text": "two squares"},
    ]
    batch = retriever.search_batch(queries, k=6)
    for query, hits in zip(queries, batch, strict=True):
        single = retriever.search(**query, k=6)
        assert [h.item_id for h in hits] == [h.item_id for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-5)
    assert retriever.search_batch([], k=3) == []
    with pytest.raises(InputError, match="expected keys"):
        retriever.search_batch([{"reference_id": ids[0], "txt": "typo"}])
    with pytest.raises(InputError, match="query 1: give reference_image or reference_id, not both"):
        retriever.search_batch([{"text": "x"}, {"reference_id": ids[0], "reference_image": retriever.item_image_path(ids[0]), "text": "x"}])


def test_search_batch_shares_the_text_cache_and_batches_uploads(retriever: Retriever) -> None:
    ids = retriever.item_ids()
    image = retriever.item_image_path(ids[2])
    assert image is not None
    retriever.search(reference_id=ids[0], text="make the circle blue", k=3)  # now cached
    queries: list[dict[str, Any]] = [
        {"reference_image": image, "text": "make the circle blue"},  # cached text, uploaded path
        {"reference_image": image.read_bytes(), "text": "remove the square"},  # raw bytes
        {"reference_image": image, "text": "remove the square"},  # repeated text and image
        {"reference_id": ids[3], "text": "a brand new text"},
    ]
    batch = retriever.search_batch(queries, k=5)
    for query, hits in zip(queries, batch, strict=True):
        single = retriever.search(**query, k=5)
        assert [h.item_id for h in hits] == [h.item_id for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-5)
    assert [h.item_id for h in batch[1]] == [h.item_id for h in batch[2]]
    with pytest.raises(InputError, match="reference_id 'no/such/item': no such item in the gallery"):
        retriever.search_batch([{"reference_id": "no/such/item", "text": "x"}])
    with pytest.raises(InputError, match="query 0: reference_image 'no/such/item' is not a file"):
        retriever.search_batch([{"reference_image": "no/such/item", "text": "x"}])

def test_timings_show_which_stages_ran(retriever: Retriever) -> None:
    item = retriever.item_ids()[0]
    full = retriever.search_detailed(reference_image=retriever.item_image_path(item), text="make it yellow", k=3)
    assert {"decode", "preprocess", "image_encode", "tokenize", "text_encode", "compose", "search"} <= set(full.timings_ms)
    cached = retriever.search_detailed(reference_id=item, text="make it purple", k=3)
    assert set(cached.timings_ms) == {"tokenize", "text_encode", "compose", "search"}  # no image work
    repeated = retriever.search_detailed(reference_id=item, text="make it purple", k=3)
    assert set(repeated.timings_ms) == {"compose", "search"} and repeated.hits == cached.hits
    assert set(full.timings_ms) <= set(STAGES) and all(ms >= 0 for ms in full.timings_ms.values())


def test_introspection(retriever: Retriever) -> None:
    info = retriever.backend_info
    assert info["backend"] == "onnxruntime" and info["variant"]
    assert all(providers == ["CPUExecutionProvider"] for providers in info["providers"].values())
    assert len(retriever) == len(retriever.item_ids()) > 10
    assert not retriever.has_reranker
    with pytest.raises(InputError, match="no re-ranker"):
        retriever.search(text="red", rerank=True)


def test_add_remove_save_reload(writable: Retriever, tiny_export: Path, tmp_path: Path) -> None:
    source = writable.item_image_path(writable.item_ids()[2])
    assert source is not None
    image = Image.open(source).convert("RGB").rotate(90)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    count = len(writable)
    added = writable.add_items({"from-path": source, "from-bytes": buffer.getvalue(), "from-pil": image}).added
    assert added == ("from-path", "from-bytes", "from-pil") and len(writable) == count + 3
    for item in added:
        stored = writable.item_image_path(item)
        assert stored is not None and stored.is_file() and (tmp_path / "index") in stored.parents
    # An added item is found by a query built from its own image.
    hits = writable.search(reference_id="from-pil", text="same", k=count + 2)
    assert {"from-path", "from-bytes"} <= {h.item_id for h in hits}
    assert writable.remove_items(["from-path"]) == 1
    writable.save()
    reopened = Retriever.from_dirs(tiny_export, tmp_path / "index", providers=["cpu"])
    assert len(reopened) == count + 2 and "from-path" not in reopened.item_ids()
    stored = reopened.item_image_path("from-bytes")
    assert stored is not None and stored.suffix == ".jpg" and stored.read_bytes() == buffer.getvalue()
    assert reopened.search(reference_id="from-bytes", text="same", k=3) == writable.search(reference_id="from-bytes", text="same", k=3)
    with pytest.raises(InputError, match="unknown item id"):
        reopened.remove_items(["from-path", "from-pil"])
    assert len(reopened) == count + 2  # nothing removed when one id is unknown


def test_adding_an_existing_id_is_refused_unless_replace(writable: Retriever) -> None:
    existing = writable.item_ids()[4]
    image = writable.item_image_path(writable.item_ids()[0])
    assert image is not None
    count, before = len(writable), np.asarray(writable.gallery.features[writable.gallery.row(existing)]).copy()
    with pytest.raises(DuplicateItemError, match=f"already in the gallery: \\[{existing!r}\\]"):
        writable.add_items({"brand-new": image, existing: image})
    assert len(writable) == count and "brand-new" not in writable.item_ids()  # nothing half-added
    np.testing.assert_array_equal(writable.gallery.features[writable.gallery.row(existing)], before)
    assert writable.add_items({existing: image, "new-too": image}, replace=True) == AddResult(added=("new-too",), replaced=(existing,))
    assert len(writable) == count + 1 and not np.array_equal(writable.gallery.features[writable.gallery.row(existing)], before)


class _ReverseReranker:
    """A real (if silly) second stage: prefers the candidates the first stage ranked last."""

    name = "reverse"

    def rerank(self, query: rerank.RerankQuery, candidates: rerank.RerankCandidates) -> np.ndarray:
        assert candidates.image_features.shape[0] == len(candidates.item_ids) == candidates.scores.shape[0]
        assert query.query_embeds.ndim == 1 and query.input_ids.ndim == 1
        return -candidates.scores


def test_reranker_hook(tiny_export: Path, tiny_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(rerank._FACTORIES, "reverse", lambda encoder, manifest, variant: _ReverseReranker())
    retriever = Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])
    retriever.rerank_top_n = 8
    assert retriever.has_reranker
    item = retriever.item_ids()[1]
    plain = retriever.search(reference_id=item, text="make it red", k=8)
    result = retriever.search_detailed(reference_id=item, text="make it red", k=8, rerank=True)
    assert [h.item_id for h in result.hits] == [h.item_id for h in reversed(plain)]
    assert "rerank" in result.timings_ms
