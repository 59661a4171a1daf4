"""The memory soak and the writes-under-load runs of ``compir bench service`` (see its docstring):
a fresh ``compir serve`` per run, driven by :mod:`benchmarks.bench_service`'s clients."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_service import _copy, _drive, _encoded, _http_call, _Server
from benchmarks.http_client import KeepAliveClient

SOAK_REQUESTS = {False: 20_000, True: 2_000}  # by quick
SOAK_CLIENTS = 16
SOAK_SAMPLES = 50
LEVEL_MB_TOLERANCE = 10.0
ADDERS = 2
ADDS = {False: 100, True: 20}  # per adder, by quick


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (Linux: /proc/PID/statm, in pages)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except OSError as exc:
        raise RuntimeError(f"cannot read the RSS of process {pid} ({exc}); the soak needs Linux /proc") from exc
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(export: Path, index: Path, queries: list[tuple[bytes, str]], *, requests: int,
         clients: int = SOAK_CLIENTS, samples: int = SOAK_SAMPLES) -> dict[str, Any]:
    """``requests`` composed uploads against a fresh server, its RSS sampled every requests/samples
    answers: {"points": [(answered, seconds, rss MiB)], figures at start / half-way / end, "levels_off"}."""
    # 13 texts per reference: more distinct texts than the runtime's text cache (1024) keeps.
    varied = _encoded([(image, f"{text}, take {take}") for take in range(13) for image, text in queries])
    server = _Server(export, index, batching=False)
    sessions = [KeepAliveClient(server.url) for _ in range(clients)]
    try:
        server.wait_ready()
        pid = server.process.pid
        call = _http_call(sessions, varied)
        step = max(1, requests // samples)
        lock = threading.Lock()
        start = time.perf_counter()
        points = [(0, 0.0, rss_mb(pid))]
        answered = 0

        def counted(client: int, n: int) -> None:
            nonlocal answered
            call(client, n)
            with lock:
                answered += 1
                if answered % step == 0:
                    points.append((answered, time.perf_counter() - start, rss_mb(pid)))

        wall, latencies = _drive(clients, requests, counted)
    finally:
        for session in sessions:
            session.close()
        server.stop()
    half = min(points, key=lambda p: abs(p[0] - requests / 2))[2]
    end, peak = points[-1][2], max(p[2] for p in points)
    return {
        "requests": requests, "clients": clients, "rps": requests / wall, "p99_ms": float(np.percentile(latencies, 99)),
        "rss_start_mb": points[0][2], "rss_half_mb": half, "rss_end_mb": end, "rss_peak_mb": peak,
        "second_half_growth_mb": end - half,
        "levels_off": end - half <= max(LEVEL_MB_TOLERANCE, 0.05 * half),
        "points": points,
    }


def add_latency(export: Path, index: Path, queries: list[tuple[bytes, str]], *, searchers: int, adds: int) -> dict[str, Any]:
    """Add p50 / p95 (ms) with ``searchers`` clients searching all along, on a copy of ``index``."""
    import httpx

    copy = _copy(index, f"adds-{searchers}")
    requests = _encoded(queries)
    server = _Server(export, copy, batching=False)
    done = threading.Event()
    search_ms: list[float] = []
    try:
        server.wait_ready()

        def search_forever(client: int) -> None:
            session = KeepAliveClient(server.url, timeout=120)
            call = _http_call([session], requests)
            for n in range(10**9):
                if done.is_set():
                    session.close()
                    return
                start = time.perf_counter()
                call(0, client * 7919 + n)
                search_ms.append((time.perf_counter() - start) * 1000.0)

        background = [threading.Thread(target=search_forever, args=(c,), daemon=True) for c in range(searchers)]
        for thread in background:
            thread.start()
        adders = [httpx.Client(base_url=server.url, timeout=120) for _ in range(ADDERS)]

        def add(client: int, n: int) -> None:
            image = queries[(client * 31 + n) % len(queries)][0]
            response = adders[client].post("/gallery/items", files=[("files", (f"bench-{client}-{n}.png", image, "image/png"))])
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

        _, latencies = _drive(ADDERS, ADDERS * adds, add)
        done.set()
        for thread in background:
            thread.join(120)
    finally:
        done.set()
        server.stop()
        shutil.rmtree(copy, ignore_errors=True)
    return {"searchers": searchers, "adds": ADDERS * adds, "add_p50_ms": float(np.percentile(latencies, 50)),
            "add_p95_ms": float(np.percentile(latencies, 95)),
            "search_p50_ms": float(np.percentile(search_ms, 50)) if search_ms else float("nan")}
