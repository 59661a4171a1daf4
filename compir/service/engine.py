"""The service's view of one :class:`~compir.runtime.retriever.Retriever`: thread-safe searches
(optionally dynamically batched) and persisted gallery writes. No HTTP here.

Searches hold a shared lock and removals an exclusive one, so a search never loses its reference
between checking and using it. An add changes the index under the retriever's own lock, which
searches also take, so no search sees it half done, and it needs no exclusive lock: a search
never waits for an add to be encoded or saved.

Durability by group commit: each write returns once a save that began after its change has
ended (each save is atomic and fsynced). Writes that arrive while a save runs are saved together
by the next one, so a write waits for at most the save in progress and its own, never for every
writer queued before it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from compir.errors import InputError
from compir.runtime.types import AddResult, Hit
from compir.runtime.uploads import validate_item_id
from compir.runtime.warmup import warm_up
from compir.service.batcher import Batcher, BatcherFactory, DynamicBatcher
from compir.service.config import ServiceConfig

if TYPE_CHECKING:
    from compir.runtime.retriever import Retriever


class UnknownItemError(InputError):
    """A request names a gallery id that the index does not hold (HTTP 404)."""


@dataclass(frozen=True)
class SearchQuery:
    """One validated query: the reference is a decoded image or a gallery id (at most one); neither is text only."""

    text: str
    k: int
    reference_image: Image.Image | None = None
    reference_id: str | None = None
    rerank: bool = False


@dataclass(frozen=True)
class SearchAnswer:
    hits: tuple[Hit, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1  # how many queries shared the model calls that answered this one


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so writes are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class ServiceEngine:
    """Owns the retriever for the lifetime of a server; ``close()`` stops the batcher.

    ``batcher`` makes the dynamic batcher (when ``config.batching`` enables one): a thread of this
    process by default, Ray Serve's ``@serve.batch`` on a Ray Serve replica."""

    def __init__(self, retriever: Retriever, *, config: ServiceConfig, batcher: BatcherFactory = DynamicBatcher) -> None:
        self.retriever = retriever
        self.config = config
        self._lock = ReadWriteLock()
        self._commits = _GroupCommit(retriever.save)
        self._batcher: Batcher[SearchQuery, SearchAnswer] | None = None
        if config.batching.enabled:
            self._batcher = batcher(self._search_batch, max_batch=config.batching.max_batch, wait_ms=config.batching.wait_ms)

    def warm_up(self) -> None:
        """Warm a retriever not opened by ``Retriever.from_dirs`` (which warms its own; a Ray replica's is
        not): every graph, the index and the image decoders run once, so the first client is not the cold one."""
        if self.retriever.warmed_up is None:
            self.retriever.warmed_up = warm_up(self.retriever)

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()

    @property
    def ready(self) -> bool:
        return self._batcher is None or self._batcher.alive

    # -- searching -------------------------------------------------------------------------
    def submit(self, query: SearchQuery) -> Future[SearchAnswer]:
        """Queue a query for the dynamic batcher. Only for queries where :meth:`batches` is true:
        with batching off, or when re-ranking (which scores one query's candidates), use :meth:`search`."""
        if self._batcher is None or query.rerank:
            raise RuntimeError("submit() needs batching enabled and a query without re-ranking")
        return self._batcher.submit(query)

    @property
    def submits_on_loop(self) -> bool:
        """:meth:`submit` must be called on the event loop (Ray Serve's batcher), not from a worker thread."""
        return self._batcher is not None and self._batcher.submit_on_loop

    def batches(self, query: SearchQuery) -> bool:
        return self._batcher is not None and not query.rerank

    def search(self, query: SearchQuery) -> SearchAnswer:
        """Answer one query on the calling thread (per-stage timings included)."""
        with self._lock.read():  # checked under the lock: a removal cannot slip in between
            self.check_reference(query.reference_id)
            result = self.retriever.search_detailed(
                text=query.text, reference_image=query.reference_image, reference_id=query.reference_id, k=query.k,
                rerank=query.rerank,
            )
        return SearchAnswer(hits=tuple(result.hits), timings_ms=dict(result.timings_ms))

    def search_many(self, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
        """One batched model call for a list of queries (POST /search/batch)."""
        k = max((q.k for q in queries), default=1)
        payload: list[Mapping[str, Any]] = [
            {"text": q.text, "reference_image": q.reference_image, "reference_id": q.reference_id} for q in queries
        ]
        with self._lock.read():
            for query in queries:
                self.check_reference(query.reference_id)
            results = self.retriever.search_batch(payload, k=k)
        return [list(hits[: q.k]) for q, hits in zip(queries, results, strict=True)]

    def _search_batch(self, queries: Sequence[SearchQuery]) -> list[SearchAnswer]:
        start = time.perf_counter()
        hits = self.search_many(queries)
        elapsed = {"batch": round((time.perf_counter() - start) * 1000.0, 3)}
        return [SearchAnswer(hits=tuple(h), timings_ms=elapsed, batch_size=len(queries)) for h in hits]

    def check_text(self, text: str, *, where: str = "") -> None:
        """The retriever's own text rule (e.g. text the tokenizer reduces to nothing), checked before
        a query is queued so that it never costs a batch."""
        self.retriever.check_text(text, where=where)

    def check_reference(self, reference_id: str | None) -> None:
        """InputError (HTTP 422) for an id outside the id grammar, UnknownItemError (HTTP 404) for
        one not in the gallery; None (no reference) passes."""
        if reference_id is None:
            return
        _check_id(reference_id, what="reference_id")
        if not self.contains(reference_id):
            raise UnknownItemError(f"reference_id {reference_id!r}: no such item in the gallery (see GET /gallery/items)")

    # -- gallery ---------------------------------------------------------------------------
    def contains(self, item_id: str) -> bool:
        return bool(self.retriever.present([item_id]))

    def image_path(self, item_id: str) -> Path | None:
        """Where the item's image lies; InputError (422) for an id outside the grammar, None when unknown."""
        _check_id(item_id, what="item_id")
        with self._lock.read():
            return self.retriever.item_image_path(item_id) if self.contains(item_id) else None

    def count(self) -> int:
        with self._lock.read():
            return len(self.retriever)

    def list_items(self, *, offset: int, limit: int) -> tuple[int, list[str]]:
        with self._lock.read():
            ids = self.retriever.item_ids()
        return len(ids), ids[offset : offset + limit]

    def add_items(self, items: Mapping[str, bytes], *, replace: bool = False) -> tuple[AddResult, int]:
        """Add and persist: (the ids added and replaced, gallery size just after), once the index on disk
        holds them. An id already in the gallery is a DuplicateItemError (HTTP 409, nothing added) unless ``replace``."""
        result = self.retriever.add_items(items, replace=replace)  # atomic under the retriever's lock
        change, count = self._commits.changed(), len(self.retriever)
        self._commits.wait_saved(change)
        return result, count

    def remove_items(self, ids: Sequence[str]) -> tuple[int, int]:
        """Remove and persist: (how many, gallery size just after); InputError (422) for an id outside
        the grammar, UnknownItemError (404) when one is not in the gallery; either way nothing is removed."""
        for item_id in ids:
            _check_id(item_id, what="item id")
        with self._lock.write():
            held = self.retriever.present(ids)
            unknown = [item_id for item_id in ids if item_id not in held]
            if unknown:
                raise UnknownItemError(f"not in the gallery: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
            removed = self.retriever.remove_items(ids)
            change, count = self._commits.changed(), len(self.retriever)
        self._commits.wait_saved(change)
        return removed, count

    def saves(self) -> int:
        """How many times the index was saved (each save may carry several writes)."""
        return self._commits.saves

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "count": self.count(),
            "backend": dict(self.retriever.backend_info),
            "has_reranker": bool(self.retriever.has_reranker),
            "config": self.config.describe(),
        }
        if self._batcher is not None:
            stats = self._batcher.stats()
            info["batching_stats"] = {
                "batches": stats.batches,
                "queries": stats.items,
                "mean_batch": round(stats.mean_batch, 3),
                "max_batch_seen": stats.max_batch_seen,
                "fallbacks": stats.fallbacks,
            }
        return info


def _check_id(item_id: str, *, what: str) -> None:
    """The id grammar the adds use (:func:`validate_item_id`), for lookups too: an InputError (422)."""
    try:
        validate_item_id(item_id)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


class _GroupCommit:
    """Counts changes and runs ``save``; :meth:`wait_saved` returns once a save that began after
    the given change has ended (see the module docstring)."""

    def __init__(self, save: Callable[[], object]) -> None:
        self._save = save
        self._counter = threading.Lock()
        self._saving = threading.Lock()
        self._changes = 0  # changes made so far (numbered 1, 2, ...)
        self._saved = 0  # every change numbered up to this is on disk
        self.saves = 0

    def changed(self) -> int:
        """Call after a change to the retriever; its number, for :meth:`wait_saved`."""
        with self._counter:
            self._changes += 1
            return self._changes

    def wait_saved(self, change: int) -> None:
        with self._saving:  # one save at a time; writers that queue here share the next one
            if self._saved >= change:
                return
            with self._counter:
                upto = self._changes  # each of these changed the retriever before this save begins
            self._save()
            self._saved, self.saves = upto, self.saves + 1
