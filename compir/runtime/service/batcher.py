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
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


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


class DynamicBatcher(Generic[Item, Result]):
    """Collect up to ``max_batch`` items, waiting at most ``wait_ms`` after the first, then run
    ``batch_fn(items) -> results`` (one result per item, same order) on a worker thread.

    ``wait_ms=0`` still batches whatever queued up while the previous batch ran, without
    delaying a lone request.
    """

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
        self._batches = 0
        self._items = 0
        self._max_seen = 0
        self._fallbacks = 0
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
        with self._lock:
            return BatchStats(self._batches, self._items, self._max_seen, self._fallbacks)

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
        with self._lock:
            self._batches += 1
            self._items += len(live)
            self._max_seen = max(self._max_seen, len(live))
        try:
            results = list(self._batch_fn([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
        except Exception as exc:
            if len(live) == 1:
                live[0][1].set_exception(exc)
                return
            with self._lock:
                self._fallbacks += 1
            for item, future in live:
                self._run_alone(item, future)
            return
        for (_, future), result in zip(live, results, strict=True):
            future.set_result(result)

    def _run_alone(self, item: Item, future: Future[Result]) -> None:
        try:
            future.set_result(self._batch_fn([item])[0])
        except Exception as exc:  # handed to the caller, who decides how to report it
            future.set_exception(exc)
