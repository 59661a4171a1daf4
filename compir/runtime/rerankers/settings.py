"""The export's stage-2 settings (``rerankers.json``) and MMRef arrays, read without torch."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from compir.contracts import read_contract
from compir.errors import ContractError
from compir.manifest import ExportManifest

RERANKERS_ARTIFACT = "rerankers"
RERANKERS_FORMAT = "compir.rerankers"  # written by compir.export.rerankers
RERANKERS_SCHEMA = 1


def reranker_settings(export_dir: Path, manifest: ExportManifest) -> dict[str, dict[str, Any]]:
    """Method name -> its settings; empty when the export has no stage-2 re-ranker."""
    artifact = manifest.artifacts.get(RERANKERS_ARTIFACT)
    if artifact is None:
        return {}
    record = read_contract(export_dir / artifact.file, fmt=RERANKERS_FORMAT, schema_version=RERANKERS_SCHEMA)
    found = record.get("rerankers")
    if not isinstance(found, dict):
        raise ContractError(f"{export_dir / artifact.file}: 'rerankers' must be an object of method settings")
    return {str(name): dict(value) for name, value in found.items()}


def load_array(export_dir: Path, manifest: ExportManifest, name: str) -> np.ndarray:
    """A float32 ``.npy`` artifact of the export (its checksum was verified with the manifest)."""
    if name not in manifest.artifacts:
        raise ContractError(f"export {export_dir} lacks artifact {name!r} that rerankers.json names; re-export")
    path = export_dir / manifest.artifacts[name].file
    try:
        return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise ContractError(f"artifact {path} is not a numpy array ({exc}); re-export") from exc


def pooled_vectors(features: np.ndarray) -> np.ndarray:
    """Cached head features (N, D) or token sets (N, K, D) -> (N, D) unit vectors.

    For the combiner (normalised vectors) and TG-CIR (normalised token mean) this is exactly the
    gallery vector the index stores, so MMRef needs nothing beyond the cached features.
    """
    vectors = features.mean(axis=1) if features.ndim == 3 else features.reshape(len(features), -1)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
