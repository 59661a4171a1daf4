"""The gallery's growable row arrays: appends equal one concatenation, copies stay amortised."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compir.runtime.rows import Rows
from compir.runtime.usearch_store import UsearchStore


def test_appends_equal_a_concatenation_and_grow_geometrically() -> None:
    rng = np.random.default_rng(0)
    rows = Rows(np.zeros((0, 3, 4), dtype=np.float32))
    chunks, buffers = [], set()
    for size in rng.integers(1, 9, size=400):
        chunk = rng.standard_normal((int(size), 3, 4)).astype(np.float32)
        rows.append(chunk)
        chunks.append(chunk)
        buffers.add(id(rows.array.base if rows.array.base is not None else rows.array))
    np.testing.assert_array_equal(rows.array, np.concatenate(chunks))
    assert len(rows) == sum(len(c) for c in chunks)
    # ~1,800 rows in 400 appends: a buffer per append would be 400; geometric growth needs ~10.
    assert len(buffers) <= 16


def test_a_memory_mapped_start_is_read_as_is_then_copied_on_append(tmp_path: Path) -> None:
    saved = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.save(tmp_path / "a.npy", saved)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    rows = Rows(mapped)
    assert rows.array is mapped
    rows.append(np.full((2, 2), -1, dtype=np.float32))
    assert not isinstance(rows.array, np.memmap)
    np.testing.assert_array_equal(rows.array, np.concatenate([saved, np.full((2, 2), -1, dtype=np.float32)]))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), saved)  # the file is untouched


def test_keep_drops_rows_in_order() -> None:
    rows = Rows(np.zeros((0, 2), dtype=np.int64))
    rows.append(np.arange(10).reshape(5, 2))
    rows.keep(np.array([True, False, True, False, True]))
    np.testing.assert_array_equal(rows.array, [[0, 1], [4, 5], [8, 9]])
    rows.append(np.array([[10, 11]]))
    np.testing.assert_array_equal(rows.array[-1], [10, 11])


def test_a_store_built_batch_by_batch_matches_one_add_and_replaces_ids() -> None:
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((300, 8)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    features = rng.standard_normal((300, 2, 8)).astype(np.float32)
    ids = [f"item{i}" for i in range(300)]
    whole, batched = UsearchStore(ndim=8, feature_shape=(2, 8)), UsearchStore(ndim=8, feature_shape=(2, 8))
    whole.add(ids, embeds=embeds, features=features, paths=ids)
    for start in range(0, 300, 7):
        end = start + 7
        batched.add(ids[start:end], embeds=embeds[start:end], features=features[start:end], paths=ids[start:end])
    np.testing.assert_array_equal(batched.features, whole.features)
    np.testing.assert_array_equal(batched.vectors.embeds, whole.vectors.embeds)
    assert batched.item_ids() == ids and [batched.row(i) for i in ids] == list(range(300))
    # Re-adding an id moves it to the end with its new rows; every other row shifts up by one.
    batched.add(["item5"], embeds=embeds[:1], features=features[:1] + 1, paths=["new"])
    assert batched.count() == 300 and batched.row("item5") == 299 and batched.row("item6") == 5
    np.testing.assert_array_equal(batched.features_of(["item5"]), features[:1] + 1)
    assert batched.paths_of(["item5", "item6"]) == ["new", "item6"]
    assert batched.search(embeds[6:7], k=1)[0][0][0] == "item6"
