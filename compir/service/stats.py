"""Per-endpoint request latency: a bounded window of recent samples and p50 / p90 / p99."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class EndpointLatency:
    """Latency of one endpoint (``"POST /search"``) over the most recent ``window`` requests."""

    endpoint: str
    requests: int  # since start, not only the window
    errors: int  # 4xx and 5xx answers since start
    window: int
    p50_ms: float
    p90_ms: float
    p99_ms: float

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "endpoint": self.endpoint,
            "requests": self.requests,
            "errors": self.errors,
            "window": self.window,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
        }


class LatencyRecorder:
    """Thread-safe: the server records from the event loop, /stats reads from a request."""

    def __init__(self, *, window: int = 2048) -> None:
        self._window = window
        self._samples: dict[str, deque[float]] = {}
        self._requests: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, endpoint: str, *, latency_ms: float, status: int) -> None:
        with self._lock:
            samples = self._samples.setdefault(endpoint, deque(maxlen=self._window))
            samples.append(latency_ms)
            self._requests[endpoint] = self._requests.get(endpoint, 0) + 1
            if status >= 400:
                self._errors[endpoint] = self._errors.get(endpoint, 0) + 1

    def summary(self) -> list[EndpointLatency]:
        with self._lock:
            snapshot = {name: np.asarray(samples, dtype=np.float64) for name, samples in self._samples.items()}
            requests, errors = dict(self._requests), dict(self._errors)
        rows = []
        for name in sorted(snapshot):
            p50, p90, p99 = (round(float(v), 3) for v in np.percentile(snapshot[name], PERCENTILES))
            rows.append(EndpointLatency(name, requests[name], errors.get(name, 0), len(snapshot[name]), p50, p90, p99))
        return rows
