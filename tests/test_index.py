"""The gallery index: usearch (f32/f16/i8) and exact search, item ids, persistence, atomic saves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compir.errors import ContractError, InputError
from compir.runtime.gallery import Gallery
from compir.runtime.index import VectorIndex

DIM = 32
EXPORT = "a" * 64


def clustered(count: int, *, dim: int = DIM, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: neighbours are close calls, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    vectors = centres[rng.integers(0, clusters, count)] + 0.35 * rng.normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def make_gallery(count: int, *, dtype: str = "f16", search_mode: str = "auto", folder: Path | None = None, seed: int = 0) -> Gallery:
    gallery = Gallery(export_sha256=EXPORT, ndim=DIM, feature_shape=(4, DIM), dtype=dtype, search_mode=search_mode, folder=folder)
    vectors = clustered(count, seed=seed)
    gallery.add([f"item{i}" for i in range(count)], embeds=vectors,
                features=np.repeat(vectors[:, None, :], 4, axis=1), paths=[f"/images/{i}.png" for i in range(count)])
    return gallery


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def test_exact_search_equals_brute_force() -> None:
    gallery = make_gallery(500)
    queries = clustered(20, seed=9)
    rows, scores = gallery.vectors.search(queries, k=10)
    assert gallery.vectors.uses_exact()
    expected = brute_force(gallery.vectors.embeds, queries, 10)
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ gallery.vectors.embeds.T, expected, 1), atol=1e-6)


@pytest.mark.parametrize(("dtype", "floor"), [("f32", 0.97), ("f16", 0.97), ("i8", 0.9)])
def test_usearch_recall_against_exact(dtype: str, floor: float) -> None:
    gallery = make_gallery(4000, dtype=dtype, search_mode="ann")
    queries = clustered(100, seed=5)
    rows, scores = gallery.vectors.search(queries, k=10)
    expected = brute_force(gallery.vectors.embeds, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, expected, strict=True)])
    assert recall >= floor, recall
    assert (np.diff(scores, axis=1) <= 1e-3).all()  # best first
    true = np.take_along_axis(queries @ gallery.vectors.embeds.T, rows, 1)
    assert np.abs(scores - true).max() < (0.02 if dtype == "i8" else 2e-3)


def test_ids_add_update_remove() -> None:
    gallery = make_gallery(50)
    target = clustered(1, seed=77)
    gallery.add(["item3"], embeds=target, features=np.zeros((1, 4, DIM), np.float32), paths=["new.png"])
    assert len(gallery) == 50
    assert gallery.search(target, k=1)[0][0][0] == "item3"
    assert gallery.features[gallery.row("item3")].sum() == 0 and gallery.paths[gallery.row("item3")] == "new.png"
    assert gallery.remove(["item3", "item4", "nope"]) == 2
    assert "item3" not in gallery and len(gallery) == 48
    assert all(hit != "item3" for hit, _ in gallery.search(target, k=48)[0])
    with pytest.raises(InputError, match="unknown item id 'item3'"):
        gallery.row("item3")
    with pytest.raises(InputError, match="unique"):
        gallery.add(["x", "x"], embeds=clustered(2), features=np.zeros((2, 4, DIM), np.float32), paths=["", ""])


def test_k_is_clamped_and_reference_excluded() -> None:
    gallery = make_gallery(7)
    query = gallery.vectors.embeds[:1].copy()
    hits = gallery.search(query, k=100)[0]
    assert len(hits) == 7 and hits[0][0] == "item0"
    hits = gallery.search(query, k=100, exclude=["item0"])[0]
    assert len(hits) == 6 and "item0" not in {h for h, _ in hits}
    empty = Gallery(export_sha256=EXPORT, ndim=DIM, feature_shape=(4, DIM))
    assert empty.search(query, k=5) == [[]]


@pytest.mark.parametrize("view", [False, True])
def test_save_and_load_round_trip(tmp_path: Path, view: bool) -> None:
    gallery = make_gallery(20_000, search_mode="ann", folder=tmp_path / "ix")  # above the exact-search size
    gallery.save()
    queries = clustered(5, seed=3)
    before = gallery.search(queries, k=5)
    loaded = Gallery.load(tmp_path / "ix", export_sha256=EXPORT, view=view)
    assert len(loaded) == 20_000 and not loaded.vectors.uses_exact()
    assert isinstance(loaded.features, np.memmap) == view
    # usearch files do not store the search breadth; the loaded graph must get index.json's.
    assert loaded.vectors._ensure_ann().expansion_search == loaded.vectors.hnsw.expansion_search == 256
    assert [[h for h, _ in row] for row in loaded.search(queries, k=5)] == [[h for h, _ in row] for row in before]
    # A memory-mapped index becomes writable on its first change (usearch views are read-only).
    loaded.add(["fresh"], embeds=queries[:1], features=np.zeros((1, 4, DIM), np.float32), paths=[""])
    loaded.remove(["item1"])
    loaded.save()
    again = Gallery.load(tmp_path / "ix", export_sha256=EXPORT)
    assert len(again) == 20_000 and "fresh" in again and "item1" not in again
    assert again.search(queries[:1], k=1)[0][0][0] == "fresh"
    record = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert record["format"] == "compir.index" and record["generation"] == 2 and record["count"] == 20_000
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == sorted(["index.json", *(f["file"] for f in record["files"].values())])


def test_index_built_with_another_encoder_is_refused(tmp_path: Path) -> None:
    make_gallery(10, folder=tmp_path).save()
    with pytest.raises(ContractError, match="built with another encoder"):
        Gallery.load(tmp_path, export_sha256="b" * 64)


@pytest.mark.parametrize("damage", ["flip-vectors", "truncate-features", "delete-items", "bad-json", "newer-schema", "count"])
def test_damaged_index_is_refused(tmp_path: Path, damage: str) -> None:
    make_gallery(30, folder=tmp_path).save()
    record = json.loads((tmp_path / "index.json").read_text())
    files = {role: tmp_path / entry["file"] for role, entry in record["files"].items()}
    if damage == "flip-vectors":
        data = bytearray(files["vectors"].read_bytes())
        data[len(data) // 2] ^= 0xFF
        files["vectors"].write_bytes(bytes(data))
    elif damage == "truncate-features":
        files["features"].write_bytes(files["features"].read_bytes()[:100])
    elif damage == "delete-items":
        files["items"].unlink()
    elif damage == "bad-json":
        (tmp_path / "index.json").write_text('{"format": "compir.index", ')
    elif damage == "newer-schema":
        (tmp_path / "index.json").write_text(json.dumps({**record, "schema_version": 99}))
    else:
        (tmp_path / "index.json").write_text(json.dumps({**record, "count": 31}))
    with pytest.raises(ContractError):
        Gallery.load(tmp_path, export_sha256=EXPORT)


_KILL_MID_SAVE = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_index import make_gallery, clustered, DIM
from compir.runtime.gallery import Gallery
gallery = Gallery.load({folder!r}, export_sha256="a" * 64)
gallery.add(["new"], embeds=clustered(1, seed=1), features=np.zeros((1, 4, DIM), np.float32), paths=[""])
gallery.remove(["item0"])
real_save = np.save
def half_then_die(handle, array, **kwargs):
    if array.ndim == 3:  # the features file: write half of it, then the process is killed
        handle.write(b"\\x93NUMPY" + b"\\0" * 4000)
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(handle, array, **kwargs)
np.save = half_then_die
gallery.save()
"""


def test_crash_in_the_middle_of_a_save_keeps_the_previous_index(tmp_path: Path) -> None:
    folder = tmp_path / "ix"
    make_gallery(40, folder=folder).save()
    before = (folder / "index.json").read_bytes()
    code = _KILL_MID_SAVE.format(tests=str(Path(__file__).parent), folder=str(folder))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert (folder / "index.json").read_bytes() == before
    reloaded = Gallery.load(folder, export_sha256=EXPORT)
    assert len(reloaded) == 40 and "item0" in reloaded and "new" not in reloaded
    assert reloaded.search(reloaded.vectors.embeds[:1], k=1)[0][0][0] == "item0"
    reloaded.save()  # the next save clears the dead save's leftovers
    record = json.loads((folder / "index.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted(["index.json", *(f["file"] for f in record["files"].values())])


def test_failed_write_leaves_index_and_memory_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gallery = make_gallery(25, folder=tmp_path)
    gallery.save()
    gallery.remove(["item2"])

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("compir.runtime.gallery.np.save", disk_full)
    with pytest.raises(OSError):
        gallery.save()
    monkeypatch.undo()
    assert len(Gallery.load(tmp_path, export_sha256=EXPORT)) == 25
    gallery.save()
    assert len(Gallery.load(tmp_path, export_sha256=EXPORT)) == 24


def test_vector_index_rejects_wrong_shapes() -> None:
    index = VectorIndex(ndim=DIM)
    with pytest.raises(ContractError):
        index.add(np.arange(2, dtype=np.uint64), np.zeros((2, DIM + 1), np.float32))
    with pytest.raises(ContractError):
        VectorIndex(ndim=DIM, dtype="f64")
