"""What a running service is allowed to accept and how it batches: one frozen record, shown by
``GET /stats`` and logged at startup so an operator sees the configuration in force."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from compir.images import DEFAULT_MAX_PIXELS


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
