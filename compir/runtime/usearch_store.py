"""The default gallery store: everything in the index folder, a usearch graph to search it.

Files (generation ``g`` increases with every save; ``index.json`` names the current one)::

    vectors.<g>.usearch    usearch HNSW graph (cosine; f32 / f16 / i8 storage)
    embeds.<g>.npy         (N, D) float32 gallery vectors (exact search, rebuilding the graph)
    features.<g>.npy       (N, *F) float32 ``image_features``
    items.<g>.json         item ids, integer keys, image paths (relative = inside the folder)

A commit writes generation ``g+1`` beside ``g`` (each file atomically); the caller then replaces
``index.json``, and only after that are older generations deleted, so a crash at any point leaves
the previous index whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from compir.contracts import atomic_output_path, atomic_write_bytes, check_header, sha256_file, verify_sha256
from compir.errors import ContractError
from compir.runtime.index import DEFAULT_DTYPE, HnswConfig, VectorIndex
from compir.runtime.rows import Rows
from compir.runtime.store import IMAGES_DIR, unknown_item

ITEMS_FORMAT = "compir.index.items"
USEARCH_SCHEMA = 2  # of index.json; still what every compir since encoder fingerprints reads
ROLES = ("vectors", "embeds", "features", "items")
RECORD_KEYS = ["dtype", "generation", "next_key", "files"]


class UsearchStore:
    """Items in row order: ids, paths and features in memory (or memory-mapped), ``vectors`` searches them."""

    backend = "usearch"
    schema_version = USEARCH_SCHEMA

    def __init__(self, *, ndim: int, feature_shape: tuple[int, ...], dtype: str = DEFAULT_DTYPE,
                 hnsw: HnswConfig = HnswConfig(), search_mode: str = "auto") -> None:
        self.vectors = VectorIndex(ndim=ndim, dtype=dtype, hnsw=hnsw, search_mode=search_mode)
        self.ids: list[str] = []
        self.paths: list[str] = []
        self._features = Rows(np.zeros((0, *feature_shape), dtype=np.float32))
        self._rows: dict[str, int] = {}
        self._next_key = 0
        self._generation = 0

    # ---- lookup ----------------------------------------------------------------------------
    @property
    def features(self) -> np.ndarray:
        """(N, *feature_shape) float32 in row order (memory-mapped where the index was opened as a view)."""
        return self._features.array

    def count(self) -> int:
        return len(self.ids)

    def contains(self, item_id: str) -> bool:
        return item_id in self._rows

    def present(self, ids: Sequence[str]) -> set[str]:
        return {item for item in ids if item in self._rows}

    def item_ids(self) -> list[str]:
        return list(self.ids)

    def row(self, item_id: str) -> int:
        if item_id not in self._rows:
            raise unknown_item(item_id, self.count())
        return self._rows[item_id]

    def features_of(self, ids: Sequence[str]) -> np.ndarray:
        return np.asarray(self.features[[self.row(item) for item in ids]], dtype=np.float32)

    def paths_of(self, ids: Sequence[str]) -> list[str]:
        return [self.paths[self.row(item)] for item in ids]

    def search(self, queries: np.ndarray, *, k: int) -> list[list[tuple[str, float]]]:
        rows, scores = self.vectors.search(queries, k=k)
        return [[(self.ids[r], float(s)) for r, s in zip(rows[q], scores[q], strict=True)] for q in range(rows.shape[0])]

    def describe(self) -> dict[str, Any]:
        return {"index_dtype": self.vectors.dtype, "exact_search": self.vectors.uses_exact()}

    # ---- mutation ----------------------------------------------------------------------------
    def claim(self, ids: Sequence[str]) -> AbstractContextManager[None]:
        """Nothing to hold: a usearch folder has one writer (its writer lock)."""
        return nullcontext()

    def add(self, ids: Sequence[str], *, embeds: np.ndarray, features: np.ndarray, paths: Sequence[str]) -> None:
        self.remove([item for item in ids if item in self._rows])
        keys = np.arange(self._next_key, self._next_key + len(ids), dtype=np.uint64)
        self.vectors.add(keys, embeds)
        self._next_key += len(ids)
        self._features.append(features)
        self._rows.update((item, row) for row, item in enumerate(ids, start=len(self.ids)))
        self.ids.extend(ids)
        self.paths.extend(paths)

    def remove(self, ids: Sequence[str]) -> int:
        rows = sorted({self._rows[item] for item in ids if item in self._rows})
        if not rows:
            return 0
        self.vectors.remove_rows(np.asarray(rows))
        keep = np.ones(len(self.ids), dtype=bool)
        keep[rows] = False
        self._features.keep(keep)
        self.ids = [item for item, kept in zip(self.ids, keep, strict=True) if kept]
        self.paths = [path for path, kept in zip(self.paths, keep, strict=True) if kept]
        self._reindex()
        return len(rows)

    def _reindex(self) -> None:
        self._rows = {item: row for row, item in enumerate(self.ids)}

    # ---- persistence ---------------------------------------------------------------------------
    def commit(self, folder: Path) -> dict[str, Any]:
        generation = self._generation + 1
        names = self._names(generation)
        with atomic_output_path(folder / names["vectors"]) as tmp:
            self.vectors.save_ann(tmp)
        _save_array(folder / names["embeds"], self.vectors.embeds)
        _save_array(folder / names["features"], self.features)
        items = {"format": ITEMS_FORMAT, "schema_version": 1, "ids": self.ids,
                 "keys": [int(key) for key in self.vectors.keys], "paths": self.paths}
        atomic_write_bytes(folder / names["items"], json.dumps(items).encode("utf-8"))
        return {
            "dtype": self.vectors.dtype,
            "generation": generation,
            "next_key": self._next_key,
            "hnsw": vars(self.vectors.hnsw),
            **({"dtype_choice": self.vectors.dtype_choice} if self.vectors.dtype_choice else {}),
            "files": {role: {"file": name, "sha256": sha256_file(folder / name)} for role, name in names.items()},
        }

    @property
    def generation(self) -> int:
        """Of the files last loaded or committed (index.json's ``generation``)."""
        return self._generation

    def committed(self, folder: Path) -> None:
        self._generation += 1
        _remove_stale(folder, keep=set(self._names(self._generation).values()), referenced=set(self.paths))

    @staticmethod
    def _names(generation: int) -> dict[str, str]:
        return {role: f"{role}.{generation}.{ext}" for role, ext in zip(ROLES, ("usearch", "npy", "npy", "json"), strict=True)}

    @classmethod
    def open(cls, folder: Path, record: dict[str, Any], *, view: bool, search_mode: str, verify: bool) -> UsearchStore:
        """The store of an index folder whose ``index.json`` (already checked) is ``record``."""
        source = str(folder / "index.json")
        files = {role: folder / record["files"][role]["file"] for role in ROLES if role in record["files"]}
        if set(files) != set(ROLES):
            raise ContractError(f"{source}: files must list {ROLES}")
        if verify:
            for role, path in files.items():
                verify_sha256(path, record["files"][role]["sha256"], what=f"index {role} file")
        store = cls(ndim=int(record["embed_dim"]), feature_shape=tuple(int(x) for x in record["feature_shape"]),
                    dtype=str(record["dtype"]), hnsw=HnswConfig(**record.get("hnsw", {})), search_mode=search_mode)
        items = check_header(_read_json(files["items"]), fmt=ITEMS_FORMAT, schema_version=1, source=str(files["items"]))
        embeds = np.load(files["embeds"], mmap_mode="r" if view else None, allow_pickle=False)
        features = np.load(files["features"], mmap_mode="r" if view else None, allow_pickle=False)
        count = int(record["count"])
        if not (len(items["ids"]) == len(items["keys"]) == len(items["paths"]) == count == embeds.shape[0] == features.shape[0]):
            raise ContractError(f"{folder}: item, vector and feature counts disagree with index.json; rebuild the index")
        store.ids, store.paths = list(items["ids"]), list(items["paths"])
        store.vectors.load(np.asarray(items["keys"], dtype=np.uint64), embeds)
        store._features = Rows(features)
        store.vectors.attach_ann(files["vectors"], view=view)
        store._next_key, store._generation = int(record["next_key"]), int(record["generation"])
        store._reindex()
        return store


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_output_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"{path} is damaged ({exc}); rebuild the index") from exc


def _remove_stale(folder: Path, *, keep: set[str], referenced: set[str]) -> None:
    """Best effort: older generations, leftover temp files, images no item refers to any more."""
    for path in folder.iterdir():
        stale_data = path.name.split(".")[0] in ROLES and path.name not in keep
        if path.is_file() and (stale_data or path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)
    images = folder / IMAGES_DIR
    if images.is_dir():
        for path in images.iterdir():
            if f"{IMAGES_DIR}/{path.name}" not in referenced:
                path.unlink(missing_ok=True)
