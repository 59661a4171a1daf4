"""Optimization profiles from the manifest's graph shapes: the named ``batch`` axis of every
input gets (min, opt, max) sizes, a text graph's ``sequence`` axis (1, typical, context length),
every other axis keeps its exported size (:func:`compute_profile` and :func:`token_range`, shared
with the runtime's onnxruntime TensorRT provider, live in :mod:`compir.engines`); and the fixed
shapes int8 calibration runs at."""

from __future__ import annotations

from compir.engines import ShapeRange, compute_profile, token_range

__all__ = ["calibration_batch", "calibration_shapes", "compute_profile", "token_range"]


def calibration_shapes(profile: dict[str, ShapeRange], *, batch: int) -> dict[str, tuple[int, ...]]:
    """The fixed shapes int8 calibration runs at (batch ``batch``, clamped into the profile; other
    axes at their largest: token ids at the full context, as the tokenizer gives them)."""
    shapes = {}
    for name, shape_range in profile.items():
        size = min(max(batch, shape_range.min[0]), shape_range.max[0])
        shapes[name] = (size, *shape_range.max[1:])
    return shapes


def calibration_batch(requested: int, *, min_batch: int, max_batch: int) -> int:
    """The batch size int8 calibration feeds: ``requested`` clamped into the profile's batch range.

    The calibration profile (:func:`calibration_shapes`) and the batches handed to the calibrator
    must have the same size: TensorRT reads that many rows from each buffer.
    """
    return min(max(requested, min_batch), max_batch)
