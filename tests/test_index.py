"""The gallery index: usearch (f32/f16/i8) and exact search, item ids, persistence, atomic saves.
The behaviour every backend shares runs on usearch and on Milvus Lite (the ``new_gallery`` fixture)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from compir.errors import ContractError, DuplicateItemError, InputError
from compir.manifest import EncoderFingerprint, PreprocessSpec
from compir.runtime.gallery import Gallery
from compir.runtime.index import VectorIndex
from compir.runtime.store import BACKENDS, GalleryStore
from compir.runtime.writer_lock import LOCK_FILE

DIM = 32
PREPROCESS = PreprocessSpec(image_size=32, resize_mode="shortest", interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
ENCODER = EncoderFingerprint(image_encoder_sha256="a" * 64, preprocess=PREPROCESS, embed_dim=DIM, metric="cos")


def clustered(count: int, *, dim: int = DIM, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: neighbours are close calls, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    vectors = centres[rng.integers(0, clusters, count)] + 0.35 * rng.normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def make_gallery(count: int, *, dtype: str = "f16", search_mode: str = "auto", folder: Path | None = None, seed: int = 0,
                 store: GalleryStore | None = None) -> Gallery:
    gallery = Gallery(encoder=ENCODER, ndim=DIM, feature_shape=(4, DIM), dtype=dtype, search_mode=search_mode, folder=folder, store=store)
    vectors = clustered(count, seed=seed)
    gallery.add([f"item{i}" for i in range(count)], embeds=vectors,
                features=np.repeat(vectors[:, None, :], 4, axis=1), paths=[f"/images/{i}.png" for i in range(count)])
    return gallery


_collections = itertools.count()


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One Milvus Lite file per module (its start is the slow part); each gallery gets a collection."""
    pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
    return str(tmp_path_factory.mktemp("milvus") / "galleries.db")


@pytest.fixture(params=BACKENDS)
def new_gallery(request: pytest.FixtureRequest) -> Callable[..., Gallery]:
    """``make_gallery`` on each backend: usearch, or a fresh collection in the module's Milvus Lite file."""
    if request.param == "usearch":
        return make_gallery
    from compir.runtime.milvus_store import MilvusConfig, MilvusStore

    uri = request.getfixturevalue("milvus_uri")

    def make(count: int, *, folder: Path | None = None, seed: int = 0) -> Gallery:
        config = MilvusConfig(uri, collection=f"gallery_{next(_collections)}")
        return make_gallery(count, folder=folder, seed=seed,
                            store=MilvusStore.create(config, ndim=DIM, feature_shape=(4, DIM), encoder=ENCODER))

    return make


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


@pytest.mark.parametrize("search_mode", ["exact", "ann"])
def test_queries_of_any_length_get_cosine_scores_on_both_paths(search_mode: str) -> None:
    gallery = make_gallery(300, dtype="f32", search_mode=search_mode)
    queries = clustered(8, seed=3)
    rows_unit, scores_unit = gallery.vectors.search(queries, k=5)
    rows, scores = gallery.vectors.search(queries * np.array([[0.1], [3.0], [1.0], [7.5], [0.5], [2.0], [1.0], [40.0]], np.float32), k=5)
    np.testing.assert_array_equal(rows, rows_unit)
    np.testing.assert_allclose(scores, scores_unit, atol=1e-5)
    assert scores.max() <= 1.0 + 1e-5


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


def test_ids_add_update_remove(new_gallery: Callable[..., Gallery]) -> None:
    gallery = new_gallery(50)
    target = clustered(1, seed=77)
    gallery.add(["item3"], embeds=target, features=np.zeros((1, 4, DIM), np.float32), paths=["new.png"])
    assert len(gallery) == 50 and gallery.ids[-1] == "item3"  # a replaced id moves to the end, as if added again
    assert gallery.search(target, k=1)[0][0][0] == "item3"
    assert gallery.features_of(["item3"]).sum() == 0 and gallery.image_path("item3") == Path("new.png")
    np.testing.assert_array_equal(gallery.features_of(["item5"])[0], np.repeat(clustered(50)[5:6], 4, axis=0))
    assert gallery.remove(["item3", "item4", "nope"]) == 2
    assert "item3" not in gallery and len(gallery) == 48
    assert gallery.ids == [f"item{i}" for i in range(50) if i not in (3, 4)]
    assert all(hit != "item3" for hit, _ in gallery.search(target, k=48)[0])
    with pytest.raises(InputError, match="unknown item id 'item3'"):
        gallery.features_of(["item3"])
    with pytest.raises(InputError, match="unknown item id 'item3'"):
        gallery.image_path("item3")
    with pytest.raises(InputError, match="unique"):
        gallery.add(["x", "x"], embeds=clustered(2), features=np.zeros((2, 4, DIM), np.float32), paths=["", ""])


def test_add_without_replace_refuses_existing_ids_and_adds_nothing(new_gallery: Callable[..., Gallery]) -> None:
    gallery = new_gallery(10)
    with pytest.raises(DuplicateItemError, match=r"already in the gallery: \['item2'\]"):
        gallery.add(["new", "item2"], embeds=clustered(2, seed=5), features=np.zeros((2, 4, DIM), np.float32),
                    paths=["", ""], replace=False)
    assert len(gallery) == 10 and "new" not in gallery
    gallery.add(["new"], embeds=clustered(1, seed=5), features=np.zeros((1, 4, DIM), np.float32), paths=[""], replace=False)
    assert len(gallery) == 11 and gallery.ids[-1] == "new"
    # Which ids are held, in one lookup (one Milvus query): repeats and unknown ids are fine.
    assert gallery.present(["item9", "nope", "new", "item9", "item0"]) == {"item9", "new", "item0"}
    assert gallery.present([]) == set()


def test_k_is_clamped_and_reference_excluded(new_gallery: Callable[..., Gallery]) -> None:
    gallery = new_gallery(7)
    query = clustered(7)[:1]  # item0's own vector
    hits = gallery.search(query, k=100)[0]
    assert len(hits) == 7 and hits[0][0] == "item0" and hits[0][1] == pytest.approx(1.0, abs=1e-3)
    hits = gallery.search(query, k=100, exclude=["item0"])[0]
    assert len(hits) == 6 and "item0" not in {h for h, _ in hits}
    two = gallery.search(np.concatenate([query, clustered(7)[1:2]]), k=2, exclude=["item0", None])
    assert [len(hits) for hits in two] == [2, 2] and "item0" not in {h for h, _ in two[0]} and two[1][0][0] == "item1"
    empty = new_gallery(0)
    assert empty.search(query, k=5) == [[]]


@pytest.mark.parametrize("view", [False, True])
def test_save_and_load_round_trip(tmp_path: Path, view: bool) -> None:
    gallery = make_gallery(20_000, search_mode="ann", folder=tmp_path / "ix")  # above the exact-search size
    gallery.save()
    queries = clustered(5, seed=3)
    before = gallery.search(queries, k=5)
    loaded = Gallery.load(tmp_path / "ix", encoder=ENCODER, view=view)
    assert len(loaded) == 20_000 and not loaded.vectors.uses_exact()
    assert isinstance(loaded.features, np.memmap) == view
    # usearch files do not store the search breadth; the loaded graph must get index.json's.
    assert loaded.vectors._ensure_ann().expansion_search == loaded.vectors.hnsw.expansion_search == 256
    assert [[h for h, _ in row] for row in loaded.search(queries, k=5)] == [[h for h, _ in row] for row in before]
    # A memory-mapped index becomes writable on its first change (usearch views are read-only).
    loaded.add(["fresh"], embeds=queries[:1], features=np.zeros((1, 4, DIM), np.float32), paths=[""])
    loaded.remove(["item1"])
    loaded.save()
    again = Gallery.load(tmp_path / "ix", encoder=ENCODER)
    assert len(again) == 20_000 and "fresh" in again and "item1" not in again
    assert again.search(queries[:1], k=1)[0][0][0] == "fresh"
    record = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert record["format"] == "compir.index" and record["generation"] == 2 and record["count"] == 20_000
    files = ["index.json", LOCK_FILE, *(f["file"] for f in record["files"].values())]  # the writer lock's file stays
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == sorted(files)


def test_index_built_with_another_encoder_is_refused(tmp_path: Path, new_gallery: Callable[..., Gallery]) -> None:
    saved = new_gallery(10, folder=tmp_path)
    saved.save()
    reopened = Gallery.load(tmp_path, encoder=ENCODER)
    assert reopened.ids == saved.ids and reopened.backend == saved.backend
    assert reopened.search(clustered(10)[2:3], k=1)[0][0][0] == "item2"
    other_graph = dataclasses.replace(ENCODER, image_encoder_sha256="b" * 64)
    with pytest.raises(ContractError, match="built with another encoder .image encoder graph sha256 aaaaaaaaaaaa"):
        Gallery.load(tmp_path, encoder=other_graph)
    other_size = dataclasses.replace(ENCODER, preprocess=dataclasses.replace(PREPROCESS, image_size=64))
    with pytest.raises(ContractError, match="built with another encoder .preprocessing"):
        Gallery.load(tmp_path, encoder=other_size)
    record = json.loads((tmp_path / "index.json").read_text())
    assert record["schema_version"] == (2 if saved.backend == "usearch" else 3) and record["encoder"]["fingerprint"] == ENCODER.digest
    record["encoder"]["embed_dim"] = DIM + 1  # edited by hand: the digest no longer matches its fields
    (tmp_path / "index.json").write_text(json.dumps(record))
    with pytest.raises(ContractError, match="does not match its fields"):
        Gallery.load(tmp_path, encoder=ENCODER)


def _as_schema_1(folder: Path, manifest_sha256: str) -> None:
    """Rewrite index.json the way compir wrote it before encoder fingerprints."""
    record = json.loads((folder / "index.json").read_text())
    del record["encoder"]
    record.update(schema_version=1, export_manifest_sha256=manifest_sha256)
    (folder / "index.json").write_text(json.dumps(record))


def test_schema_1_index_opens_with_its_own_manifest_and_is_upgraded_on_save(tmp_path: Path) -> None:
    make_gallery(10, folder=tmp_path).save()
    _as_schema_1(tmp_path, "m" * 64)
    with pytest.raises(ContractError, match="schema 1.*rebuild it with `compir index build`"):
        Gallery.load(tmp_path, encoder=ENCODER, manifest_sha256="n" * 64)
    with pytest.raises(ContractError, match="schema 1"):
        Gallery.load(tmp_path, encoder=ENCODER)
    unbound = Gallery.load(tmp_path, encoder=None)  # readable, but cannot be saved unbound
    assert len(unbound) == 10
    with pytest.raises(ContractError, match="opened without its export"):
        unbound.save()
    gallery = Gallery.load(tmp_path, encoder=ENCODER, manifest_sha256="m" * 64)
    assert len(gallery) == 10 and gallery.encoder == ENCODER
    gallery.save()
    record = json.loads((tmp_path / "index.json").read_text())
    assert record["schema_version"] == 2 and "export_manifest_sha256" not in record
    assert len(Gallery.load(tmp_path, encoder=ENCODER)) == 10


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
        Gallery.load(tmp_path, encoder=ENCODER)


_KILL_MID_SAVE = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_index import make_gallery, clustered, DIM, ENCODER
from compir.runtime.gallery import Gallery
gallery = Gallery.load({folder!r}, encoder=ENCODER)
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
    reloaded = Gallery.load(folder, encoder=ENCODER)
    assert len(reloaded) == 40 and "item0" in reloaded and "new" not in reloaded
    assert reloaded.search(reloaded.vectors.embeds[:1], k=1)[0][0][0] == "item0"
    reloaded.save()  # the next save clears the dead save's leftovers
    record = json.loads((folder / "index.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted(["index.json", LOCK_FILE, *(f["file"] for f in record["files"].values())])


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
    assert len(Gallery.load(tmp_path, encoder=ENCODER)) == 25
    gallery.save()
    assert len(Gallery.load(tmp_path, encoder=ENCODER)) == 24


def test_vector_index_rejects_wrong_shapes() -> None:
    index = VectorIndex(ndim=DIM)
    with pytest.raises(ContractError):
        index.add(np.arange(2, dtype=np.uint64), np.zeros((2, DIM + 1), np.float32))
    with pytest.raises(ContractError):
        VectorIndex(ndim=DIM, dtype="f64")
