"""Dynamic batching: requests that arrive within a short window are run as one batch.

A single worker thread owns the batch function, so a model session sees one large call instead
of many small concurrent ones. Each request gets a :class:`concurrent.futures.Future`; async
callers await it with :func:`asyncio.wrap_future`. When the batch function raises, every item
is retried alone so each caller receives its own result or its own error.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
_Query = TypeVar("_Query", contravariant=True)


@dataclass(frozen=True)
class BatchStats:
    """Counters since start: how many batches ran and how full they were."""

    batches: int
    items: int
    max_batch_seen: int
    fallbacks: int  # batches that raised and were retried one item at a time

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class Batcher(Protocol[_Query, Result]):
    """What the service needs of a batcher: :class:`DynamicBatcher` here, or one on Ray Serve's
    ``@serve.batch`` (:mod:`compir.service.ray_serve`). ``submit_on_loop``: ``submit`` must be
    called on the event loop (Serve's batch queue lives there), not from a worker thread."""

    submit_on_loop: bool

    def submit(self, item: _Query) -> Future[Result]: ...

    def close(self) -> None: ...

    @property
    def alive(self) -> bool: ...

    def stats(self) -> BatchStats: ...


class BatcherFactory(Protocol):
    """``factory(batch_fn, max_batch=..., wait_ms=...)`` -> a :class:`Batcher` running ``batch_fn``."""

    def __call__(self, batch_fn: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int, wait_ms: float) -> Batcher[Any, Any]: ...


class BatchCounter:
    """Thread-safe :class:`BatchStats` counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches = 0
        self._items = 0
        self._max_seen = 0
        self._fallbacks = 0

    def record(self, size: int) -> None:
        with self._lock:
            self._batches += 1
            self._items += size
            self._max_seen = max(self._max_seen, size)

    def record_fallback(self) -> None:
        with self._lock:
            self._fallbacks += 1

    def stats(self) -> BatchStats:
        with self._lock:
            return BatchStats(self._batches, self._items, self._max_seen, self._fallbacks)


def run_batch(batch_fn: Callable[[Sequence[Item]], Sequence[Result]], items: Sequence[Item],
              counter: BatchCounter) -> list[Result | Exception]:
    """``batch_fn(items)``, one result per item; when the batch raises, every item is run alone so
    each gets its own result or its own exception (returned, not raised)."""
    counter.record(len(items))
    try:
        results = list(batch_fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return list(results)
    except Exception as exc:
        if len(items) == 1:
            return [exc]
    counter.record_fallback()
    alone: list[Result | Exception] = []
    for item in items:
        try:
            alone.append(batch_fn([item])[0])
        except Exception as exc:  # handed to the caller, who decides how to report it
            alone.append(exc)
    return alone


class DynamicBatcher(Generic[Item, Result]):
    """Collect up to ``max_batch`` items, waiting at most ``wait_ms`` after the first, then run
    ``batch_fn(items) -> results`` (one result per item, same order) on a worker thread.

    ``wait_ms=0`` still batches whatever queued up while the previous batch ran, without
    delaying a lone request.
    """

    submit_on_loop = False  # thread-safe: the search route queues from its worker thread

    def __init__(
        self,
        batch_fn: Callable[[Sequence[Item]], Sequence[Result]],
        *,
        max_batch: int = 16,
        wait_ms: float = 2.0,
        name: str = "compir-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_ms < 0:
            raise ValueError(f"wait_ms must be >= 0, got {wait_ms}")
        self.max_batch = max_batch
        self.wait_ms = wait_ms
        self._batch_fn = batch_fn
        self._queue: queue.Queue[tuple[Item, Future[Result]] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._counter = BatchCounter()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> Future[Result]:
        """Queue ``item``; the future resolves to its result or raises its error."""
        future: Future[Result] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put((item, future))
        return future

    def close(self, *, timeout: float = 10.0) -> None:
        """Finish the queued items, then stop the worker thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def stats(self) -> BatchStats:
        return self._counter.stats()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending = [first]
            stop = self._collect(pending)
            self._execute(pending)
            if stop:
                return

    def _collect(self, pending: list[tuple[Item, Future[Result]]]) -> bool:
        """Fill ``pending`` until it is full or the window closes; True when close() was seen."""
        deadline = time.monotonic() + self.wait_ms / 1000.0
        while len(pending) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if entry is None:
                return True
            pending.append(entry)
        return False

    def _execute(self, pending: list[tuple[Item, Future[Result]]]) -> None:
        live = [(item, future) for item, future in pending if future.set_running_or_notify_cancel()]
        if not live:
            return
        results = run_batch(self._batch_fn, [item for item, _ in live], self._counter)
        for (_, future), result in zip(live, results, strict=True):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
