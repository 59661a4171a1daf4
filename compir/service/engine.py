"""The service's view of one :class:`~compir.runtime.retriever.Retriever`: thread-safe searches
(optionally dynamically batched) and serialised, persisted gallery writes. No HTTP here.

Searches hold a shared lock and gallery writes an exclusive one, so a search never sees a
half-updated index and no write is lost; each write is saved atomically before it returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from compir.errors import InputError
from compir.runtime.types import AddResult, Hit
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
        self._batcher: Batcher[SearchQuery, SearchAnswer] | None = None
        if config.batching.enabled:
            self._batcher = batcher(self._search_batch, max_batch=config.batching.max_batch, wait_ms=config.batching.wait_ms)

    def warm_up(self) -> None:
        """One composed query through every graph, so the first client does not pay for session start-up."""
        self.retriever.search(reference_image=Image.new("RGB", (64, 64), "white"), text="warm up", k=1)

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
        """Raise UnknownItemError (HTTP 404) unless ``reference_id`` is None or a gallery id."""
        if reference_id is not None and not self.contains(reference_id):
            raise UnknownItemError(f"reference_id {reference_id!r}: no such item in the gallery (see GET /gallery/items)")

    # -- gallery ---------------------------------------------------------------------------
    def contains(self, item_id: str) -> bool:
        return bool(self.retriever.present([item_id]))

    def image_path(self, item_id: str) -> Path | None:
        with self._lock.read():
            return self.retriever.item_image_path(item_id) if self.contains(item_id) else None

    def count(self) -> int:
        with self._lock.read():
            return len(self.retriever)

    def list_items(self, *, offset: int, limit: int) -> tuple[int, list[str]]:
        with self._lock.read():
            ids = self.retriever.item_ids()
        return len(ids), ids[offset : offset + limit]

    def add_items(self, items: Mapping[str, bytes], *, replace: bool = False) -> AddResult:
        """Add and persist; the index on disk holds the new items when this returns. An id already
        in the gallery is a DuplicateItemError (HTTP 409, nothing added) unless ``replace``."""
        with self._lock.write():
            added = self.retriever.add_items(items, replace=replace)
            self.retriever.save()
        return added

    def remove_items(self, ids: Sequence[str]) -> int:
        """Remove and persist; UnknownItemError (nothing removed) when an id is not in the gallery."""
        with self._lock.write():
            held = self.retriever.present(ids)
            unknown = [item_id for item_id in ids if item_id not in held]
            if unknown:
                raise UnknownItemError(f"not in the gallery: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
            removed = self.retriever.remove_items(ids)
            if removed:
                self.retriever.save()
        return removed

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
