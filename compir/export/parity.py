"""Export-time checks that each ONNX graph computes what the torch model computes.

fp32 graphs must match torch within an absolute tolerance on real inputs, at batch size 1 and at
a larger batch (a graph traced with a baked-in batch size passes one and fails the other).
Reduced-precision variants are compared to the fp32 graph by the cosine of their embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compir.errors import ContractError
from compir.export.graphs import GraphDef, run_torch, select_batch
from compir.runtime.backends.ort import open_session

__all__ = ["CUT_TOLERANCE", "FP32_TOLERANCE", "check_fp32_graph", "check_fp32_parity", "mean_cosine", "open_session", "run_session"]

FP32_TOLERANCE = 1e-4
CUT_TOLERANCE = 1e-5  # a text batch cut after its longest text against the same batch at full length


def run_session(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [out.name for out in session.get_outputs()]
    wanted = {inp.name for inp in session.get_inputs()}
    values = session.run(names, {name: array for name, array in feeds.items() if name in wanted})
    return {name: np.asarray(value, dtype=np.float32) for name, value in zip(names, values, strict=True)}


def check_fp32_parity(
    defn: GraphDef,
    *,
    path: Path,
    feeds: dict[str, np.ndarray],
    tolerance: float = FP32_TOLERANCE,
) -> float:
    """Max abs difference between onnxruntime and torch over every output, at batch 1 and batch N.

    Raises ContractError naming the graph, the output and the figure when it exceeds ``tolerance``.
    """
    return _parity(defn, open_session(path), feeds=feeds, tolerance=tolerance)[0]


def check_fp32_graph(
    defn: GraphDef, *, path: Path, feeds: dict[str, np.ndarray], pad_id: int, tolerance: float = FP32_TOLERANCE,
) -> tuple[float, dict[str, np.ndarray]]:
    """Every export-time check of one fp32 graph in one onnxruntime session: parity to torch and, where
    the graph has a sequence axis, the length cut. Returns the worst parity difference and the graph's
    outputs on ``feeds`` (the reference the reduced-precision variants are compared to)."""
    session = open_session(path)
    worst, outputs = _parity(defn, session, feeds=feeds, tolerance=tolerance)
    if defn.sequence_names:  # the runtime cuts texts after the longest: prove it changes nothing here
        _check_length_cut(defn, session, feeds=feeds, full=outputs, pad_id=pad_id)
    return worst, outputs


def _parity(defn: GraphDef, session: Any, *, feeds: dict[str, np.ndarray], tolerance: float) -> tuple[float, dict[str, np.ndarray]]:
    batch = len(next(iter(feeds.values())))
    if batch < 2:
        raise ContractError(f"parity check of {defn.role} needs at least 2 samples, got {batch}")
    expected_all = run_torch(defn, feeds)  # (N, ...) per output; row 0 is batch 1's answer
    worst = 0.0
    actual: dict[str, np.ndarray] = {}
    for subset in ([0], list(range(batch))):
        actual = run_session(session, select_batch(feeds, subset))
        for name in defn.output_names:
            expected = expected_all[name][subset]
            if actual[name].shape != expected.shape:
                raise ContractError(
                    f"parity: {defn.role} output {name!r} has shape {actual[name].shape} in onnxruntime and "
                    f"{expected.shape} in torch (batch {len(subset)}); the export is wrong"
                )
            diff = float(np.max(np.abs(actual[name] - expected))) if expected.size else 0.0
            if not np.isfinite(diff) or diff > tolerance:
                raise ContractError(
                    f"parity: {defn.role} output {name!r} differs from torch by max abs {diff:.3g} at batch "
                    f"{len(subset)} (tolerance {tolerance:g}); the ONNX graph does not compute what the model does"
                )
            worst = max(worst, diff)
    return worst, actual  # the last subset is the whole batch


def _check_length_cut(
    defn: GraphDef, session: Any, *, feeds: dict[str, np.ndarray], full: dict[str, np.ndarray], pad_id: int,
    tolerance: float = CUT_TOLERANCE,
) -> float:
    """Max abs difference between the graph's outputs ``full`` on ``feeds`` and on the same feeds cut
    after the longest text (as the runtime runs it; ``token_features`` compared over the kept
    positions). ContractError above ``tolerance``: the text tower is not one whose outputs survive the cut."""
    from compir.runtime.encoder import fit_length

    cut_feeds = {name: fit_length(a, length=None, pad_id=pad_id) if name == "input_ids" else a for name, a in feeds.items()}
    kept = cut_feeds["input_ids"].shape[1]
    worst = 0.0
    for name, value in run_session(session, cut_feeds).items():
        expected = full[name][:, :kept] if name in defn.sequence_names else full[name]
        diff = float(np.max(np.abs(value - expected))) if value.shape == expected.shape else float("inf")
        if not diff <= tolerance:
            raise ContractError(
                f"parity: {defn.role} output {name!r} changes by {diff:.3g} when the texts are cut from {feeds['input_ids'].shape[1]} "
                f"to {kept} tokens (tolerance {tolerance:g}); this text tower must keep its fixed length"
            )
        worst = max(worst, diff)
    return worst


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine of two (N, D) arrays (1.0 means the same directions)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))
