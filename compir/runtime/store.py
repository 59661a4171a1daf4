"""The index-backend interface: where a :class:`~compir.runtime.gallery.Gallery` keeps its items.

A store holds, per string item id, the gallery vector (L2-normalised, searched by cosine), the
cached ``image_features`` and the image path. :class:`~compir.runtime.gallery.Gallery` adds what
is the same on every backend on top: the encoder binding in ``index.json``, the reference left out
of its own hits, id checks, images uploaded at run time. Two stores implement it:
:class:`~compir.runtime.usearch_store.UsearchStore` (the default: everything in the index folder)
and :class:`~compir.runtime.milvus_store.MilvusStore` (a Milvus collection is the source of truth).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compir.errors import InputError

BACKENDS = ("usearch", "milvus")
IMAGES_DIR = "images"  # of the index folder: images added at run time, named by content hash


class GalleryStore(Protocol):
    """Items under string ids. Ids are listed in the order they were added (a replaced id moves
    to the end); ``search`` returns up to ``min(k, count)`` (id, cosine) per query, best first."""

    backend: str  # one of BACKENDS, recorded in index.json
    schema_version: int  # of the index.json it is described by

    def count(self) -> int: ...

    def contains(self, item_id: str) -> bool: ...

    def present(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the store holds, in one lookup (one Milvus query, not one per id)."""
        ...

    def item_ids(self) -> list[str]: ...

    def claim(self, ids: Sequence[str]) -> AbstractContextManager[None]:
        """Held by an add that must not replace, around its check and its write: refuses
        (DuplicateItemError) ids that another writer of a shared store is adding meanwhile."""
        ...

    def add(self, ids: Sequence[str], *, embeds: np.ndarray, features: np.ndarray, paths: Sequence[str]) -> None:
        """Add unique ``ids`` (an id already present is replaced); all or nothing."""
        ...

    def remove(self, ids: Sequence[str]) -> int:
        """Remove the ids present (others are ignored); returns how many were removed."""
        ...

    def search(self, queries: np.ndarray, *, k: int) -> list[list[tuple[str, float]]]: ...

    def features_of(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), *F) float32 cached image features; every id must be present."""
        ...

    def paths_of(self, ids: Sequence[str]) -> list[str]: ...

    def commit(self, folder: Path) -> dict[str, Any]:
        """Make every change durable (files written into ``folder``, or the collection flushed) and
        return the backend's fields of ``index.json``; nothing is committed until that file is replaced."""
        ...

    def committed(self, folder: Path) -> None:
        """Called once ``index.json`` names this commit: clean up what it no longer needs."""
        ...

    def describe(self) -> dict[str, Any]:
        """What a service reports about the index (``/stats``)."""
        ...


def unknown_item(item_id: str, count: int) -> InputError:
    return InputError(f"unknown item id {item_id!r} (the index holds {count} items)")
