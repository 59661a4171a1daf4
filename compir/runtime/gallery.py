"""The index folder: gallery items (string ids), their vectors, cached image features and image
paths, bound to the export that encoded them, in one of two backends (``index.json`` says which).

Layout of ``INDEX_DIR``::

    index.json    format "compir.index": encoder fingerprint, embed_dim, feature_shape, count, and
                  the backend's part: usearch files + sha256 (schema 2), or Milvus URI, collection
                  and index parameters (``"backend": "milvus"``, schema 3)
    ...           usearch: the generation files (:mod:`compir.runtime.usearch_store`)
    images/       images added at run time, named by content hash, so they persist

The items themselves live in a :class:`~compir.runtime.store.GalleryStore`: usearch files in the
folder (the default; :mod:`compir.runtime.usearch_store`) or a Milvus collection
(:mod:`compir.runtime.milvus_store`). :class:`Gallery` adds what every backend shares: the encoder
binding, the reference left out of its own hits, checks on what is added, uploaded images.

The index is bound to the encoder's :class:`~compir.manifest.EncoderFingerprint` (image-encoder
graph checksum, preprocessing, embed_dim, metric): what determines its vectors, so a re-export of
the same checkpoint keeps it valid and a different image encoder is refused. Schema 1 recorded
the export manifest's sha256 instead; such an index opens with the export whose manifest has
exactly those bytes and is rewritten as schema 2 on its next save.

A save commits the store (usearch: the next generation of files beside the current one; Milvus:
a flush) and then replaces ``index.json``: that rename is the commit. A crash at any point
before it leaves the previous index whole.

One writer per usearch folder: a gallery takes the folder's writer lock
(:mod:`compir.runtime.writer_lock`) at load with ``writable=True`` or before its first change, and
refuses to change a folder that another process saved since it was read. Readers take nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compir.contracts import (
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_SCHEMA,
    atomic_write_bytes,
    read_contract,
    require_keys,
    sha256_bytes,
    write_contract,
)
from compir.errors import ContractError, DuplicateItemError, InputError
from compir.manifest import EncoderFingerprint
from compir.runtime.index import DEFAULT_DTYPE, HnswConfig, VectorIndex
from compir.runtime.store import BACKENDS, IMAGES_DIR, GalleryStore
from compir.runtime.usearch_store import RECORD_KEYS, UsearchStore
from compir.runtime.writer_lock import WriterLock

__all__ = ["IMAGES_DIR", "Gallery", "read_index_record"]


class Gallery:
    """The items of one index folder; ``store`` holds them (a new usearch store unless given)."""

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
        store: GalleryStore | None = None,
    ) -> None:
        self.encoder = encoder  # None only for a schema-1 index opened without its export
        self.ndim = ndim
        self.feature_shape = tuple(feature_shape)
        self.folder = Path(folder) if folder is not None else None
        self.store: GalleryStore = store if store is not None else UsearchStore(
            ndim=ndim, feature_shape=self.feature_shape, dtype=dtype, hnsw=hnsw, search_mode=search_mode)
        self._locked_folder: Path | None = None  # a loaded usearch folder: its writer lock is taken before any write
        self._writer: WriterLock | None = None

    def __len__(self) -> int:
        return self.store.count()

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self.store.contains(item_id)

    def present(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the gallery holds, in one store lookup."""
        return self.store.present(ids)

    @property
    def backend(self) -> str:
        return self.store.backend

    @property
    def ids(self) -> list[str]:
        """Item ids in the order they were added."""
        return self.store.item_ids()

    # ---- usearch rows (in-memory arrays; a Milvus gallery has none) ---------------------------
    @property
    def vectors(self) -> VectorIndex:
        return self._usearch().vectors

    @property
    def features(self) -> np.ndarray:
        """(N, *F) image features in row order (usearch); any backend: :meth:`features_of`."""
        return self._usearch().features

    @property
    def paths(self) -> list[str]:
        return self._usearch().paths

    def row(self, item_id: str) -> int:
        return self._usearch().row(item_id)

    def _usearch(self) -> UsearchStore:
        if not isinstance(self.store, UsearchStore):
            raise ContractError(f"a {self.backend} gallery has no in-memory rows; use features_of() / image_path()")
        return self.store

    # ---- lookup ----------------------------------------------------------------------------
    def features_of(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), *F) float32 cached image features; InputError naming an unknown id."""
        return self.store.features_of(ids)

    def image_path(self, item_id: str) -> Path | None:
        return self.image_paths([item_id])[0]

    def image_paths(self, ids: Sequence[str]) -> list[Path | None]:
        """Where each item's image lies (None where none was recorded), in one store lookup."""
        return [self._resolve(stored) if stored else None for stored in self.store.paths_of(ids)]

    def _resolve(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() or self.folder is None else self.folder / path

    def search(self, queries: np.ndarray, *, k: int, exclude: Sequence[str | None] = ()) -> list[list[tuple[str, float]]]:
        """(Q, D) -> per query up to ``k`` (item id, cosine), best first; ``exclude[q]`` is left out."""
        extra = 1 if any(exclude) else 0
        found = self.store.search(np.ascontiguousarray(queries, dtype=np.float32), k=k + extra)
        results: list[list[tuple[str, float]]] = []
        for q, hits in enumerate(found):
            skip = exclude[q] if q < len(exclude) else None
            results.append([hit for hit in hits if hit[0] != skip][:k])
        return results

    def describe(self) -> dict[str, Any]:
        """The backend's facts a service reports (index dtype or Milvus collection, ...)."""
        return self.store.describe()

    # ---- mutation ----------------------------------------------------------------------------
    def add(self, ids: Sequence[str], *, embeds: np.ndarray, features: np.ndarray, paths: Sequence[str],
            replace: bool = True) -> None:
        """Add items; an id already present is replaced (its old row is removed first), or with
        ``replace=False`` refused as a DuplicateItemError and nothing added: the check and the add
        are one call, under the store's claim on the ids, so two writers of one gallery (even two
        processes on one Milvus server) cannot both add the same new id."""
        if len(set(ids)) != len(ids):
            raise InputError("item ids in one call must be unique")
        if features.shape[1:] != self.feature_shape:
            raise ContractError(f"image features have shape {features.shape[1:]}, the index stores {self.feature_shape}")
        if embeds.ndim != 2 or embeds.shape != (len(ids), self.ndim) or features.shape[0] != len(ids) or len(paths) != len(ids):
            raise ContractError(f"expected ({len(ids)}, {self.ndim}) embeddings and {len(ids)} features and paths, "
                                f"got {embeds.shape}, {features.shape[0]} and {len(paths)}")
        if not ids:
            return
        if replace:
            self.hold_writer_lock()
            self.store.add(ids, embeds=embeds, features=features, paths=paths)
            return
        with self.store.claim(ids):
            refuse_existing(self, ids)
            self.hold_writer_lock()
            self.store.add(ids, embeds=embeds, features=features, paths=paths)

    def remove(self, ids: Sequence[str]) -> int:
        """Remove the given ids (unknown ones are ignored); returns how many were removed."""
        self.hold_writer_lock()
        return self.store.remove(ids)

    def store_image(self, data: bytes, *, suffix: str) -> str:
        """Copy an image into ``images/`` (named by content hash); returns its relative path."""
        if self.folder is None:
            raise ContractError("this gallery has no folder yet; save it before adding images")
        self.hold_writer_lock()
        relative = f"{IMAGES_DIR}/{sha256_bytes(data)[:24]}{suffix}"
        target = self.folder / relative
        if not target.exists():
            atomic_write_bytes(target, data)
        return relative

    # ---- one writer per folder -----------------------------------------------------------------
    def hold_writer_lock(self) -> None:
        """Take the folder's writer lock (:mod:`compir.runtime.writer_lock`) unless held: a usearch
        gallery loaded from a folder takes it at its first write, or at load with ``writable=True``;
        a ContractError names the process holding it."""
        if self._locked_folder is None or self._writer is not None:
            return
        writer = WriterLock.acquire(self._locked_folder)
        if _saved_generation(self._locked_folder) != self._usearch().generation:
            writer.release()
            raise ContractError(f"index {self._locked_folder} was saved by another process since this one opened it; "
                                "reopen it before changing it (its changes would be lost)")
        self._writer = writer

    def close(self) -> None:
        """Release the writer lock, if held (the gallery stays readable; a later write takes it again)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, folder: str | Path | None = None) -> Path:
        """Commit the store (usearch: the next generation of files), then replace ``index.json``."""
        target = Path(folder) if folder is not None else self.folder
        if target is None:
            raise ContractError("no index folder to save to")
        if self.encoder is None:
            raise ContractError("this index (schema 1) was opened without its export, so it cannot be bound to an encoder; "
                                "open it with its export (Retriever.from_dirs) or rebuild it with `compir index build`")
        target.mkdir(parents=True, exist_ok=True)
        self.hold_writer_lock()
        backend_fields = self.store.commit(target)
        body: dict[str, Any] = {
            "encoder": {"fingerprint": self.encoder.digest, **self.encoder.to_dict()},
            "count": len(self),  # at this save (a shared Milvus collection changes between saves)
            "embed_dim": self.ndim,
            "feature_shape": list(self.feature_shape),
            "metric": "cos",
            **backend_fields,
        }
        write_contract(target / INDEX_FILE, fmt=INDEX_FORMAT, schema_version=self.store.schema_version, body=body)
        self.folder = target
        self.store.committed(target)
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
        writable: bool = False,
    ) -> Gallery:
        """Read an index folder built with ``encoder`` (ContractError naming what differs if it was
        built with another; None skips the check). ``manifest_sha256`` (the export's
        ``manifest.json`` checksum) opens a schema-1 index, which recorded only that.
        ``view=True`` memory-maps a usearch index's vectors and features (large galleries); a
        Milvus index connects to its collection (ContractError if it cannot). ``writable=True``
        takes a usearch folder's writer lock now (ContractError naming the holder), not at the
        first write: for a process that will write (a server)."""
        folder = Path(folder)
        record, bound = read_index_record(folder, encoder=encoder, manifest_sha256=manifest_sha256)
        ndim, feature_shape = int(record["embed_dim"]), tuple(int(x) for x in record["feature_shape"])
        if record.get("backend", "usearch") == "milvus":
            from compir.runtime.milvus_store import MilvusStore

            store = MilvusStore.open(record, encoder=bound, source=str(folder / INDEX_FILE))
            return cls(encoder=bound, ndim=ndim, feature_shape=feature_shape, folder=folder, store=store)
        writer = WriterLock.acquire(folder) if writable else None
        try:
            if writer is not None:  # read again under the lock: the last writer may have saved meanwhile
                record, bound = read_index_record(folder, encoder=encoder, manifest_sha256=manifest_sha256)
            usearch = UsearchStore.open(folder, record, view=view, search_mode=search_mode, verify=verify)
        except BaseException:
            if writer is not None:
                writer.release()
            raise
        gallery = cls(encoder=bound, ndim=ndim, feature_shape=feature_shape, folder=folder, store=usearch)
        gallery._locked_folder, gallery._writer = folder, writer
        return gallery


def read_index_record(
    folder: Path, *, encoder: EncoderFingerprint | None, manifest_sha256: str | None = None
) -> tuple[dict[str, Any], EncoderFingerprint | None]:
    """``index.json`` of ``folder``, checked against ``encoder`` as :meth:`Gallery.load` does, and
    the fingerprint the index is bound to; reads no vectors (a quick check before a slow start)."""
    if not folder.is_dir():
        raise ContractError(f"index folder {folder} does not exist; build it with `compir index build`")
    record = read_contract(folder / INDEX_FILE, fmt=INDEX_FORMAT, schema_version=INDEX_SCHEMA)
    source = str(folder / INDEX_FILE)
    backend = record.get("backend", "usearch")
    if backend not in BACKENDS:
        raise ContractError(f"{source}: backend {backend!r} is not one of {BACKENDS}")
    backend_keys = ["milvus"] if backend == "milvus" else RECORD_KEYS
    require_keys(record, ["count", "embed_dim", "feature_shape", *backend_keys], source=source)
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


def _saved_generation(folder: Path) -> int | None:
    try:
        return int(read_contract(folder / INDEX_FILE, fmt=INDEX_FORMAT, schema_version=INDEX_SCHEMA)["generation"])
    except (ContractError, KeyError, TypeError, ValueError):
        return None


def refuse_existing(gallery: Gallery, ids: Sequence[str]) -> None:
    """DuplicateItemError naming the ids (the first five) that ``gallery`` already holds."""
    held = gallery.present(ids)
    existing = [item for item in ids if item in held]
    if existing:
        raise DuplicateItemError(
            f"already in the gallery: {existing[:5]}{' ...' if len(existing) > 5 else ''}; "
            "remove them first, or add with replace=true to replace them")
