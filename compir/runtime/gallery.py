"""The index folder: gallery items (string ids), their vectors, cached image features and image
paths, saved atomically and bound to the export that encoded them.

Layout of ``INDEX_DIR`` (generation ``g`` increases with every save)::

    index.json             format "compir.index": export manifest sha256, dtype, count, files + sha256
    vectors.<g>.usearch    usearch HNSW graph (cosine; f32 / f16 / i8 storage)
    embeds.<g>.npy         (N, D) float32 gallery vectors (exact search, rebuilding the graph)
    features.<g>.npy       (N, *F) float32 ``image_features``: a query whose reference is a gallery
                           item is composed from these, with no image encode
    items.<g>.json         item ids, integer keys, image paths (relative = inside the folder)
    images/                images added at run time, named by content hash, so they persist

A save writes generation ``g+1`` beside ``g`` (each file atomically) and then replaces
``index.json``: that rename is the commit. A crash at any point before it leaves the previous
index whole; files of older generations are deleted only after the commit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compir.contracts import (
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_SCHEMA,
    atomic_output_path,
    atomic_write_bytes,
    check_header,
    read_contract,
    require_keys,
    sha256_bytes,
    sha256_file,
    verify_sha256,
    write_contract,
)
from compir.errors import ContractError, InputError
from compir.runtime.index import DEFAULT_DTYPE, HnswConfig, VectorIndex

ITEMS_FORMAT = "compir.index.items"
IMAGES_DIR = "images"
_ROLES = ("vectors", "embeds", "features", "items")


class Gallery:
    """Items of one index folder, in row order; ``vectors`` searches them."""

    def __init__(
        self,
        *,
        export_sha256: str,
        ndim: int,
        feature_shape: tuple[int, ...],
        dtype: str = DEFAULT_DTYPE,
        hnsw: HnswConfig = HnswConfig(),
        search_mode: str = "auto",
        folder: str | Path | None = None,
    ) -> None:
        self.export_sha256 = export_sha256
        self.feature_shape = tuple(feature_shape)
        self.folder = Path(folder) if folder is not None else None
        self.vectors = VectorIndex(ndim=ndim, dtype=dtype, hnsw=hnsw, search_mode=search_mode)
        self.ids: list[str] = []
        self.paths: list[str] = []
        self.features = np.zeros((0, *self.feature_shape), dtype=np.float32)
        self._rows: dict[str, int] = {}
        self._next_key = 0
        self._generation = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    # ---- lookup ----------------------------------------------------------------------------
    def row(self, item_id: str) -> int:
        if item_id not in self._rows:
            raise InputError(f"unknown item id {item_id!r} (the index holds {len(self)} items)")
        return self._rows[item_id]

    def image_path(self, item_id: str) -> Path | None:
        stored = self.paths[self.row(item_id)]
        if not stored:
            return None
        path = Path(stored)
        return path if path.is_absolute() or self.folder is None else self.folder / path

    def search(self, queries: np.ndarray, *, k: int, exclude: Sequence[str | None] = ()) -> list[list[tuple[str, float]]]:
        """(Q, D) -> per query up to ``k`` (item id, cosine), best first; ``exclude[q]`` is left out."""
        extra = 1 if any(exclude) else 0
        rows, scores = self.vectors.search(queries, k=k + extra)
        results: list[list[tuple[str, float]]] = []
        for q in range(rows.shape[0]):
            skip = exclude[q] if q < len(exclude) else None
            hits = [(self.ids[r], float(s)) for r, s in zip(rows[q], scores[q], strict=True) if self.ids[r] != skip]
            results.append(hits[:k])
        return results

    # ---- mutation ----------------------------------------------------------------------------
    def add(self, ids: Sequence[str], *, embeds: np.ndarray, features: np.ndarray, paths: Sequence[str]) -> None:
        """Add items; an id already present is replaced (its old row is removed first)."""
        if len(set(ids)) != len(ids):
            raise InputError("item ids in one call must be unique")
        if features.shape[1:] != self.feature_shape:
            raise ContractError(f"image features have shape {features.shape[1:]}, the index stores {self.feature_shape}")
        self.remove([item for item in ids if item in self._rows])
        keys = np.arange(self._next_key, self._next_key + len(ids), dtype=np.uint64)
        self.vectors.add(keys, embeds)
        self._next_key += len(ids)
        self.features = np.concatenate([self.features, np.asarray(features, dtype=np.float32)])
        self.ids.extend(ids)
        self.paths.extend(paths)
        self._reindex()

    def remove(self, ids: Sequence[str]) -> int:
        """Remove the given ids (unknown ones are ignored); returns how many were removed."""
        rows = sorted({self._rows[item] for item in ids if item in self._rows})
        if not rows:
            return 0
        self.vectors.remove_rows(np.asarray(rows))
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self.features = self.features[keep]
        self.ids = [item for item, kept in zip(self.ids, keep, strict=True) if kept]
        self.paths = [path for path, kept in zip(self.paths, keep, strict=True) if kept]
        self._reindex()
        return len(rows)

    def store_image(self, data: bytes, *, suffix: str) -> str:
        """Copy an image into ``images/`` (named by content hash); returns its relative path."""
        if self.folder is None:
            raise ContractError("this gallery has no folder yet; save it before adding images")
        relative = f"{IMAGES_DIR}/{sha256_bytes(data)[:24]}{suffix}"
        target = self.folder / relative
        if not target.exists():
            atomic_write_bytes(target, data)
        return relative

    def _reindex(self) -> None:
        self._rows = {item: row for row, item in enumerate(self.ids)}

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, folder: str | Path | None = None) -> Path:
        """Write the next generation of files, then commit by replacing ``index.json``."""
        target = Path(folder) if folder is not None else self.folder
        if target is None:
            raise ContractError("no index folder to save to")
        target.mkdir(parents=True, exist_ok=True)
        generation = self._generation + 1
        names = {role: f"{role}.{generation}.{ext}" for role, ext in zip(_ROLES, ("usearch", "npy", "npy", "json"), strict=True)}
        with atomic_output_path(target / names["vectors"]) as tmp:
            self.vectors.save_ann(tmp)
        _save_array(target / names["embeds"], self.vectors.embeds)
        _save_array(target / names["features"], self.features)
        items = {"format": ITEMS_FORMAT, "schema_version": 1, "ids": self.ids,
                 "keys": [int(key) for key in self.vectors.keys], "paths": self.paths}
        atomic_write_bytes(target / names["items"], json.dumps(items).encode("utf-8"))
        body: dict[str, Any] = {
            "export_manifest_sha256": self.export_sha256,
            "dtype": self.vectors.dtype,
            "count": len(self),
            "embed_dim": self.vectors.ndim,
            "feature_shape": list(self.feature_shape),
            "metric": "cos",
            "generation": generation,
            "next_key": self._next_key,
            "hnsw": vars(self.vectors.hnsw),
            "files": {role: {"file": name, "sha256": sha256_file(target / name)} for role, name in names.items()},
        }
        write_contract(target / INDEX_FILE, fmt=INDEX_FORMAT, schema_version=INDEX_SCHEMA, body=body)
        self._generation, self.folder = generation, target
        _remove_stale(target, keep=set(names.values()), referenced=set(self.paths))
        return target

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        export_sha256: str | None,
        view: bool = False,
        search_mode: str = "auto",
        verify: bool = True,
    ) -> Gallery:
        """Read an index folder. ``export_sha256`` (the encoder's manifest checksum) must match the
        one it was built with; ``view=True`` memory-maps vectors and features (large galleries)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ContractError(f"index folder {folder} does not exist; build it with `compir index build`")
        record = read_contract(folder / INDEX_FILE, fmt=INDEX_FORMAT, schema_version=INDEX_SCHEMA)
        source = str(folder / INDEX_FILE)
        required = ["export_manifest_sha256", "dtype", "count", "embed_dim", "feature_shape", "generation", "next_key", "files"]
        require_keys(record, required, source=source)
        if export_sha256 is not None and record["export_manifest_sha256"] != export_sha256:
            raise ContractError(
                f"index {folder} was built with another encoder (export manifest sha256 "
                f"{str(record['export_manifest_sha256'])[:12]}..., this export is {export_sha256[:12]}...); "
                "rebuild it with `compir index build` for this export"
            )
        files = {role: folder / record["files"][role]["file"] for role in _ROLES if role in record["files"]}
        if set(files) != set(_ROLES):
            raise ContractError(f"{source}: files must list {_ROLES}")
        if verify:
            for role, path in files.items():
                verify_sha256(path, record["files"][role]["sha256"], what=f"index {role} file")
        gallery = cls(
            export_sha256=record["export_manifest_sha256"],
            ndim=int(record["embed_dim"]),
            feature_shape=tuple(int(x) for x in record["feature_shape"]),
            dtype=str(record["dtype"]),
            hnsw=HnswConfig(**record.get("hnsw", {})),
            search_mode=search_mode,
            folder=folder,
        )
        items = check_header(_read_json(files["items"]), fmt=ITEMS_FORMAT, schema_version=1, source=str(files["items"]))
        embeds = np.load(files["embeds"], mmap_mode="r" if view else None, allow_pickle=False)
        features = np.load(files["features"], mmap_mode="r" if view else None, allow_pickle=False)
        count = int(record["count"])
        if not (len(items["ids"]) == len(items["keys"]) == len(items["paths"]) == count == embeds.shape[0] == features.shape[0]):
            raise ContractError(f"{folder}: item, vector and feature counts disagree with index.json; rebuild the index")
        gallery.ids, gallery.paths = list(items["ids"]), list(items["paths"])
        gallery.vectors.keys = np.asarray(items["keys"], dtype=np.uint64)
        gallery.vectors.embeds, gallery.features = embeds, features
        gallery.vectors.attach_ann(files["vectors"], view=view)
        gallery._next_key, gallery._generation = int(record["next_key"]), int(record["generation"])
        gallery._reindex()
        return gallery


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
        stale_data = path.name.split(".")[0] in _ROLES and path.name not in keep
        if path.is_file() and (stale_data or path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)
    images = folder / IMAGES_DIR
    if images.is_dir():
        for path in images.iterdir():
            if f"{IMAGES_DIR}/{path.name}" not in referenced:
                path.unlink(missing_ok=True)

