"""Index building's decode-ahead: results in order, and a bounded number decoded ahead."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compir.runtime.build import _ahead


def test_decode_ahead_keeps_order_and_a_bounded_window() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def work(item: Path) -> str:
        with lock:
            started.append(int(item.name))
        return item.name

    items = [Path(str(i)) for i in range(200)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = []
        for read, value in enumerate(_ahead(pool, work, items, window=8), start=1):
            results.append(value)
            with lock:
                assert len(started) <= read + 8, f"{len(started)} started after {read} read"
    assert results == [str(i) for i in range(200)]
