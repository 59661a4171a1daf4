"""The dynamic batcher and the read/write lock on real functions and real threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from compir.service.batcher import DynamicBatcher
from compir.service.engine import ReadWriteLock

_RAW = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
GALLERY = _RAW / np.linalg.norm(_RAW, axis=1, keepdims=True)  # unit rows: each row is its own best match


def top1(queries: Sequence[np.ndarray]) -> list[int]:
    """A real batched search: (B, 8) @ (8, 50) -> best gallery row per query."""
    batch = np.stack(queries)
    if not np.isfinite(batch).all():
        raise ValueError("query contains NaN")
    return [int(i) for i in np.argmax(batch @ GALLERY.T, axis=1)]


def test_concurrent_submissions_are_batched_and_each_gets_its_own_answer():
    batcher: DynamicBatcher[np.ndarray, int] = DynamicBatcher(top1, max_batch=8, wait_ms=20)
    queries = [GALLERY[i] + 0.01 for i in range(40)]
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda q: batcher.submit(q).result(timeout=10), queries))
        stats = batcher.stats()
    finally:
        batcher.close()
    assert answers == list(range(40))
    assert stats.items == 40
    assert 1 < stats.max_batch_seen <= 8
    assert stats.batches < 40


def test_a_failing_item_fails_alone():
    batcher: DynamicBatcher[np.ndarray, int] = DynamicBatcher(top1, max_batch=16, wait_ms=50)
    bad = np.full(8, np.nan, dtype=np.float32)
    try:
        futures = [batcher.submit(GALLERY[i]) for i in range(5)] + [batcher.submit(bad)]
        with pytest.raises(ValueError, match="NaN"):
            futures[-1].result(timeout=10)
        assert [f.result(timeout=10) for f in futures[:5]] == list(range(5))
        assert batcher.stats().fallbacks == 1
    finally:
        batcher.close()


def test_zero_wait_runs_a_lone_query_at_once_and_close_drains_the_queue():
    calls: list[int] = []

    def slow(items: Sequence[int]) -> list[int]:
        calls.append(len(items))
        time.sleep(0.05)
        return [x * 2 for x in items]

    batcher: DynamicBatcher[int, int] = DynamicBatcher(slow, max_batch=4, wait_ms=0)
    futures = [batcher.submit(i) for i in range(10)]
    batcher.close()
    assert [f.result(timeout=1) for f in futures] == [i * 2 for i in range(10)]
    assert max(calls) <= 4 and sum(calls) == 10
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)
    assert not batcher.alive


@pytest.mark.parametrize("wait_ms", [0.0, 300.0])
def test_a_lone_query_waits_for_the_window_only(wait_ms):
    batcher: DynamicBatcher[np.ndarray, int] = DynamicBatcher(top1, max_batch=8, wait_ms=wait_ms)
    try:
        start = time.perf_counter()
        assert batcher.submit(GALLERY[3]).result(timeout=10) == 3
        elapsed_ms = (time.perf_counter() - start) * 1000
    finally:
        batcher.close()
    assert elapsed_ms >= wait_ms
    assert elapsed_ms < wait_ms + 250  # generous: 2 shared cores


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(top1, max_batch=0)
    with pytest.raises(ValueError, match="wait_ms"):
        DynamicBatcher(top1, wait_ms=-1)


def test_writer_excludes_readers_and_no_update_is_lost():
    lock = ReadWriteLock()
    state = {"value": 0, "readers": 0, "overlap": False}
    guard = threading.Lock()

    def write() -> None:
        with lock.write():
            with guard:
                state["overlap"] |= state["readers"] > 0
            current = state["value"]
            time.sleep(0.001)  # widens the window a lost update would need
            state["value"] = current + 1

    def read() -> None:
        with lock.read():
            with guard:
                state["readers"] += 1
            time.sleep(0.001)
            with guard:
                state["readers"] -= 1

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(write if i % 3 == 0 else read) for i in range(90)]:
            future.result(timeout=10)
    assert state["value"] == 30
    assert not state["overlap"]
