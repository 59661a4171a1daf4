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
        self.references = references  # (M, D)
        self.projection = projection  # (D, D)
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
        projected = vectors @ self.projection.T
        projected /= np.maximum(np.linalg.norm(projected, axis=-1, keepdims=True), 1e-12)
        logits = projected @ self.references.T / self.temperature
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        return weights / np.maximum(np.linalg.norm(weights, axis=-1, keepdims=True), 1e-12)  # type: ignore[no-any-return]

    def refine(self, query_embeds: np.ndarray, candidate_vectors: np.ndarray, first_stage: np.ndarray) -> np.ndarray:
        """query (D,), candidates (N, D), first-stage cosine (N,) -> refined scores (N,)."""
        similarity = self.coordinates(candidate_vectors) @ self.coordinates(query_embeds[None])[0]
        return (1.0 - self.weight) * first_stage + self.weight * similarity  # type: ignore[no-any-return]
