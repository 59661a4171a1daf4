"""What a running service is allowed to accept and how it batches: one frozen record, shown by
``GET /stats`` and logged at startup so an operator sees the configuration in force."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from compir.images import DEFAULT_MAX_PIXELS
from compir.runtime.backends.providers import GPU_PROVIDERS


@dataclass(frozen=True)
class Limits:
    """Request limits; each refusal names the limit and the ``compir serve`` option that sets it."""

    max_upload_bytes: int = 8 * 1024 * 1024  # per uploaded image
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_text_chars: int = 1000
    max_k: int = 100
    max_batch_queries: int = 64  # queries in one POST /search/batch, files in one gallery upload

    @property
    def max_request_bytes(self) -> int:
        # A gallery upload may carry max_batch_queries images; 1 MiB covers form fields and framing.
        return self.max_upload_bytes * self.max_batch_queries + (1 << 20)

    def option(self, name: str) -> str:
        """The CLI flag that sets limit ``name`` (for messages)."""
        return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of concurrent single searches (``enabled=False`` runs each alone)."""

    enabled: bool = True
    max_batch: int = 16
    wait_ms: float = 2.0
    reason: str = "configured"  # why it is on or off, shown in /stats and the startup log


def resolve_batching(mode: str, *, backend_info: dict[str, Any], max_batch: int, wait_ms: float) -> BatchingConfig:
    """``mode`` on / off, or auto: on where a batch is cheaper than its queries one by one.

    On a CPU the encoders are compute-bound (measured with the tiny model: 16 images in one call
    cost about as much as 16 calls), so batching only adds its wait window; on a GPU one call of
    16 costs little more than one of 1, so batching multiplies throughput.
    """
    if mode in ("on", "off"):
        return BatchingConfig(enabled=mode == "on", max_batch=max_batch, wait_ms=wait_ms, reason=f"--batching {mode}")
    if mode != "auto":
        raise ValueError(f"batching mode must be auto, on or off, not {mode!r}")
    on_gpu = backend_info.get("backend") == "tensorrt" or any(p in str(backend_info.get("providers")) for p in GPU_PROVIDERS)
    reason = "auto: the encoders run on a GPU" if on_gpu else "auto: the encoders run on the CPU, where batches do not pay"
    return BatchingConfig(enabled=on_gpu, max_batch=max_batch, wait_ms=wait_ms, reason=reason)


@dataclass(frozen=True)
class ServiceConfig:
    limits: Limits = Limits()
    batching: BatchingConfig = BatchingConfig()
    api_key: str | None = None
    worker_threads: int = 8  # threads that decode uploads and run unbatched searches

    def describe(self) -> dict[str, Any]:
        """Public view (the API key itself is never shown)."""
        return {
            "limits": asdict(self.limits),
            "batching": asdict(self.batching),
            "auth": "api-key" if self.api_key else "none",
            "worker_threads": self.worker_threads,
        }
