"""The index folder: gallery items (string ids), their vectors, cached image features and image
paths, saved atomically and bound to the export that encoded them.

Layout of ``INDEX_DIR`` (generation ``g`` increases with every save)::

    index.json             format "compir.index": encoder fingerprint, dtype, count, files + sha256
    vectors.<g>.usearch    usearch HNSW graph (cosine; f32 / f16 / i8 storage)
    embeds.<g>.npy         (N, D) float32 gallery vectors (exact search, rebuilding the graph)
    features.<g>.npy       (N, *F) float32 ``image_features``: a query whose reference is a gallery
                           item is composed from these, with no image encode
    items.<g>.json         item ids, integer keys, image paths (relative = inside the folder)
    images/                images added at run time, named by content hash, so they persist

The index is bound to the encoder's :class:`~compir.manifest.EncoderFingerprint` (image-encoder
graph checksum, preprocessing, embed_dim, metric): what determines its vectors, so a re-export of
the same checkpoint keeps it valid and a different image encoder is refused. Schema 1 recorded
the export manifest's sha256 instead; such an index opens with the export whose manifest has
exactly those bytes and is rewritten as schema 2 on its next save.

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
from compir.manifest import EncoderFingerprint
from compir.runtime.index import DEFAULT_DTYPE, HnswConfig, VectorIndex

ITEMS_FORMAT = "compir.index.items"
IMAGES_DIR = "images"
_ROLES = ("vectors", "embeds", "features", "items")


class Gallery:
    """Items of one index folder, in row order; ``vectors`` searches them."""

    def __init__(
        self,
        *,
        encoder: EncoderFingerprint | None,
        ndim: int,
        feature_shape: tuple[int, ...],
        dtype: str = DEFAULT_DTYPE,
        hnsw: HnswConfig = HnswConfig(),
        search_mode: str = "auto",
        folder: str | Path | None = None,
    ) -> None:
        self.encoder = encoder  # None only for a schema-1 index opened without its export
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

    def features_of(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), *F) float32 cached ``image_features`` of gallery items, looked up by id
        (InputError for an unknown one), so a caller never holds a row that a removal may shift."""
        return np.asarray(self.features[[self.row(item_id) for item_id in ids]], dtype=np.float32).reshape(len(ids), *self.feature_shape)

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
        if self.encoder is None:
            raise ContractError("this index (schema 1) was opened without its export, so it cannot be bound to an encoder; "
                                "open it with its export (Retriever.from_dirs) or rebuild it with `compir index build`")
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
            "encoder": {"fingerprint": self.encoder.digest, **self.encoder.to_dict()},
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
        encoder: EncoderFingerprint | None,
        manifest_sha256: str | None = None,
        view: bool = False,
        search_mode: str = "auto",
        verify: bool = True,
    ) -> Gallery:
        """Read an index folder built with ``encoder`` (ContractError naming what differs if it was
        built with another; None skips the check). ``manifest_sha256`` (the export's
        ``manifest.json`` checksum) opens a schema-1 index, which recorded only that.
        ``view=True`` memory-maps vectors and features (large galleries)."""
        folder = Path(folder)
        record, bound = read_index_record(folder, encoder=encoder, manifest_sha256=manifest_sha256)
        source = str(folder / INDEX_FILE)
        files = {role: folder / record["files"][role]["file"] for role in _ROLES if role in record["files"]}
        if set(files) != set(_ROLES):
            raise ContractError(f"{source}: files must list {_ROLES}")
        if verify:
            for role, path in files.items():
                verify_sha256(path, record["files"][role]["sha256"], what=f"index {role} file")
        gallery = cls(
            encoder=bound,
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


def read_index_record(
    folder: Path, *, encoder: EncoderFingerprint | None, manifest_sha256: str | None = None
) -> tuple[dict[str, Any], EncoderFingerprint | None]:
    """``index.json`` of ``folder``, checked against ``encoder`` as :meth:`Gallery.load` does, and
    the fingerprint the index is bound to; reads no vectors (a quick check before a slow start)."""
    if not folder.is_dir():
        raise ContractError(f"index folder {folder} does not exist; build it with `compir index build`")
    record = read_contract(folder / INDEX_FILE, fmt=INDEX_FORMAT, schema_version=INDEX_SCHEMA)
    required = ["dtype", "count", "embed_dim", "feature_shape", "generation", "next_key", "files"]
    require_keys(record, required, source=str(folder / INDEX_FILE))
    return record, _check_binding(record, encoder=encoder, manifest_sha256=manifest_sha256, folder=folder)


def _check_binding(record: dict[str, Any], *, encoder: EncoderFingerprint | None, manifest_sha256: str | None,
                   folder: Path) -> EncoderFingerprint | None:
    """The fingerprint the index is bound to, after checking it against ``encoder``'s."""
    source = str(folder / INDEX_FILE)
    rebuild = "rebuild it with `compir index build` for this export (or open it with the export it was built with)"
    if record["schema_version"] == 1:
        require_keys(record, ["export_manifest_sha256"], source=source)
        if encoder is None:
            return None
        if manifest_sha256 is None or record["export_manifest_sha256"] != manifest_sha256:
            raise ContractError(
                f"index {folder} has schema 1, which binds it to the exact bytes of an export manifest "
                f"(sha256 {str(record['export_manifest_sha256'])[:12]}...), and this export's differ; {rebuild}"
            )
        return encoder  # the very manifest it was built with
    require_keys(record, ["encoder"], source=source)
    built = EncoderFingerprint.from_dict(record["encoder"], source=source)
    if record["encoder"].get("fingerprint") != built.digest:
        raise ContractError(f"{source}: the encoder fingerprint does not match its fields (edited by hand?); {rebuild}")
    if encoder is not None and built != encoder:
        raise ContractError(f"index {folder} was built with another encoder ({'; '.join(built.differences(encoder))}); {rebuild}")
    return built


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

