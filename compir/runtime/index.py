"""Vector search over gallery embeddings: a usearch HNSW index (cosine, f32/f16/i8 storage) for
large galleries and an exact numpy path for small ones.

Items are addressed by integer keys here; :mod:`compir.runtime.gallery` maps string item ids to
keys and stores everything on disk. Keys are handed out in increasing order and rows are kept in
key order, so ``row = searchsorted(keys, key)`` needs no dictionary for a million items.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compir.errors import ContractError
from compir.runtime.ann_dtype import choose_dtype, fill, metric_for, unit_rows
from compir.runtime.rows import Rows

if TYPE_CHECKING:
    from usearch.index import Index

DTYPES = ("f32", "f16", "bf16", "i8")
AUTO_DTYPE = "auto"  # measured at build time (compir.runtime.ann_dtype.choose_dtype)
DTYPE_CHOICES = (*DTYPES, AUTO_DTYPE)
DEFAULT_DTYPE = "f16"
EXACT_MAX_ITEMS = 16_384  # below this a (N, D) @ (D,) product beats the HNSW walk and is exact
SEARCH_MODES = ("auto", "exact", "ann")


@dataclass(frozen=True)
class HnswConfig:
    """usearch graph settings; recall vs speed is traded by ``expansion_search``."""

    connectivity: int = 16
    expansion_add: int = 128
    # `compir bench index` on 1M x 512 clustered vectors (f16): recall@10 0.974 at 128, 0.992 at
    # 256 (still 56x the exact search's queries/s); the walk costs well under a millisecond.
    expansion_search: int = 256


class VectorIndex:
    """L2-normalised (N, D) vectors under sorted uint64 keys, searchable by cosine similarity.

    ``embeds`` (N, D) float32 (possibly memory-mapped) back the exact path; the usearch index is
    built lazily from them when an approximate search is first needed and no saved graph exists.
    ``dtype="auto"`` is resolved when that graph is built (the sample's measurements are kept in
    ``dtype_choice``); a gallery small enough for the exact path gets the default without measuring.
    """

    def __init__(
        self,
        *,
        ndim: int,
        dtype: str = DEFAULT_DTYPE,
        hnsw: HnswConfig = HnswConfig(),
        search_mode: str = "auto",
    ) -> None:
        if dtype not in DTYPE_CHOICES:
            raise ContractError(f"index dtype {dtype!r} is not one of {DTYPE_CHOICES}")
        if search_mode not in SEARCH_MODES:
            raise ValueError(f"search_mode {search_mode!r} is not one of {SEARCH_MODES}")
        self.ndim = ndim
        self.dtype = dtype
        self.hnsw = hnsw
        self.search_mode = search_mode
        self._keys = Rows(np.zeros((0,), dtype=np.uint64))
        self._embeds = Rows(np.zeros((0, ndim), dtype=np.float32))
        self._ann: Index | None = None  # built or restored on demand
        self._ann_is_view = False
        self.dtype_choice: dict[str, object] | None = None  # what "auto" measured, for index.json

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> np.ndarray:
        return self._keys.array

    @property
    def embeds(self) -> np.ndarray:
        return self._embeds.array

    def load(self, keys: np.ndarray, embeds: np.ndarray) -> None:
        """Take saved rows as they are (``embeds`` may be memory-mapped); the graph is attached apart."""
        self._keys, self._embeds = Rows(np.asarray(keys, dtype=np.uint64)), Rows(embeds)

    # ---- mutation ------------------------------------------------------------------------
    def add(self, keys: np.ndarray, embeds: np.ndarray) -> None:
        """Append vectors (K, D) under new keys, all larger than every key present."""
        keys = np.asarray(keys, dtype=np.uint64)
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if embeds.ndim != 2 or embeds.shape[1] != self.ndim or embeds.shape[0] != keys.shape[0]:
            raise ContractError(f"expected ({keys.shape[0]}, {self.ndim}) embeddings, got {embeds.shape}")
        if len(self) and keys.size and keys.min() <= self.keys[-1]:
            raise ValueError("new keys must be larger than the existing ones")
        self._keys.append(keys)
        self._embeds.append(embeds)
        if self._ann is not None:
            self._writable_ann().add(keys, unit_rows(embeds))

    def remove_rows(self, rows: np.ndarray) -> None:
        """Drop the given row indices (and their keys)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        if self._ann is not None:
            self._writable_ann().remove(self.keys[rows])
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self._keys.keep(keep)
        self._embeds.keep(keep)

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.keys, np.asarray(keys, dtype=np.uint64))

    # ---- search --------------------------------------------------------------------------
    def uses_exact(self) -> bool:
        return self.search_mode == "exact" or (self.search_mode == "auto" and len(self) <= EXACT_MAX_ITEMS)

    def search(self, queries: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> (rows (Q, k') int64, scores (Q, k') float32), best first; k' = min(k, N).

        Scores are cosine similarities on both paths (queries are scaled to unit length first; the ANN path
        reports them at the storage precision).
        """
        queries = unit_rows(queries)
        count = min(int(k), len(self))
        if count <= 0:
            return np.zeros((queries.shape[0], 0), np.int64), np.zeros((queries.shape[0], 0), np.float32)
        if self.uses_exact():
            return _exact_search(self.embeds, queries, count)
        matches = self._ensure_ann().search(queries, count, exact=False)
        keys = np.asarray(matches.keys, dtype=np.uint64).reshape(queries.shape[0], -1)[:, :count]
        dist = np.asarray(matches.distances, dtype=np.float32).reshape(queries.shape[0], -1)[:, :count]
        # One query comes back as Matches (no .counts), several as BatchMatches.
        counts = np.asarray(getattr(matches, "counts", [len(matches.keys)])).reshape(-1)
        if (counts < count).any():  # HNSW may return fewer; pad with the exact answer for those rows
            short = np.nonzero(counts < count)[0]
            rows_exact, scores_exact = _exact_search(self.embeds, queries[short], count)
            rows = self.rows_of(keys)
            rows[short], dist[short] = rows_exact, 1.0 - scores_exact
            return rows.astype(np.int64), (1.0 - dist).astype(np.float32)
        return self.rows_of(keys).astype(np.int64), (1.0 - dist).astype(np.float32)

    # ---- persistence -----------------------------------------------------------------------
    def save_ann(self, path: Path) -> None:
        """Write the usearch graph (built now if needed) to ``path``."""
        self._ensure_ann().save(str(path))

    def attach_ann(self, path: Path, *, view: bool) -> None:
        """Use a saved graph; ``view=True`` memory-maps it (read-only until the first change)."""
        from usearch.index import Index

        ann = Index.restore(str(path), view=view)
        if ann is None or len(ann) != len(self) or ann.ndim != self.ndim:
            raise ContractError(f"{path}: the usearch graph does not match the index record (rebuild the index)")
        # usearch files do not keep the search breadth (restore() gives 64): set it from index.json.
        ann.expansion_search = self.hnsw.expansion_search  # type: ignore[misc]  # usearch has a setter; its stub misses it
        self._ann, self._ann_is_view = ann, view

    def _ensure_ann(self) -> Index:
        if self._ann is None:
            from usearch.index import Index

            self._resolve_dtype()
            ann = Index(
                ndim=self.ndim,
                metric=metric_for(self.dtype),
                dtype=self.dtype,
                connectivity=self.hnsw.connectivity,
                expansion_add=self.hnsw.expansion_add,
                expansion_search=self.hnsw.expansion_search,
            )
            fill(ann, self.keys, self.embeds)
            self._ann, self._ann_is_view = ann, False
        return self._ann

    def _resolve_dtype(self) -> None:
        if self.dtype != AUTO_DTYPE:
            return
        if len(self) <= EXACT_MAX_ITEMS:
            self.dtype = DEFAULT_DTYPE
            self.dtype_choice = {"chosen": DEFAULT_DTYPE, "not_measured": f"{len(self)} items are searched exactly"}
            return
        choice = choose_dtype(self.embeds, connectivity=self.hnsw.connectivity, expansion_add=self.hnsw.expansion_add,
                              expansion_search=self.hnsw.expansion_search)
        self.dtype, self.dtype_choice = choice.dtype, choice.record()

    def _writable_ann(self) -> Index:
        # usearch crashes the process when a memory-mapped view is modified: copy it in first.
        if self._ann is not None and self._ann_is_view:
            self._ann = self._ann.copy()
            self._ann_is_view = False
        return self._ensure_ann()


def _exact_search(embeds: np.ndarray, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ np.asarray(embeds, dtype=np.float32).T  # (Q, N) cosine: both sides unit length
    if count < scores.shape[1]:
        top = np.argpartition(-scores, count - 1, axis=1)[:, :count]
    else:
        top = np.broadcast_to(np.arange(scores.shape[1]), (scores.shape[0], scores.shape[1])).copy()
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1).astype(np.int64), np.take_along_axis(top_scores, order, axis=1)
