"""MMRef's reference-based similarity at query time (numpy; see compir.train.mmref)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compir.manifest import ExportManifest
from compir.runtime.rerankers.settings import load_array


class MMRefStage:
    """``(1 - weight) * cos + weight * cos(coords(q), coords(c))``, coords = softmax(P x . R^T / tau)."""

    name = "mmref"

    def __init__(self, *, references: np.ndarray, projection: np.ndarray, weight: float, temperature: float) -> None:
        self.references_t = np.ascontiguousarray(references.T)  # (D, M)
        self.projection_t = np.ascontiguousarray(projection.T)  # (D, D)
        self.weight = float(weight)
        self.temperature = float(temperature)

    @classmethod
    def from_export(cls, export_dir: Path, manifest: ExportManifest, settings: dict[str, Any]) -> MMRefStage:
        return cls(
            references=load_array(export_dir, manifest, str(settings["references"])),
            projection=load_array(export_dir, manifest, str(settings["projection"])),
            weight=float(settings["weight"]),
            temperature=float(settings["temperature"]),
        )

    def coordinates(self, vectors: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, M) unit-length soft assignments to the references."""
        projected = _matmul(vectors, self.projection_t)
        projected /= np.maximum(np.linalg.norm(projected, axis=-1, keepdims=True), 1e-12)
        logits = _matmul(projected, self.references_t) / self.temperature
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        return weights / np.maximum(np.linalg.norm(weights, axis=-1, keepdims=True), 1e-12)

    def refine(self, query_embeds: np.ndarray, candidate_vectors: np.ndarray, first_stage: np.ndarray) -> np.ndarray:
        """query (D,), candidates (N, D), first-stage cosine (N,) -> refined scores (N,)."""
        similarity = self.coordinates(candidate_vectors) @ self.coordinates(query_embeds[None])[0]
        return (1.0 - self.weight) * first_stage + self.weight * similarity


# Products above this many multiply-adds make OpenBLAS start its thread pool; for a top-N
# re-rank (50 x 128 x a few thousand) waking the pool costs far more than it saves, and on a
# busy machine it stalls for tens of milliseconds. Row chunks below the threshold stay on the
# calling thread (~0.2 ms for 50 candidates x 1,000 references).
_SINGLE_THREAD_MACS = 1 << 18


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for (N, K) x (K, M), computed in row chunks small enough to stay single-threaded."""
    rows = max(1, _SINGLE_THREAD_MACS // max(1, b.shape[0] * b.shape[1]))
    if len(a) <= rows:
        return a @ b
    return np.concatenate([a[start : start + rows] @ b for start in range(0, len(a), rows)])
