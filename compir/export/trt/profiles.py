"""Optimization profiles from the manifest's graph shapes: the named ``batch`` axis of every
input gets (min, opt, max) sizes, every other axis keeps its exported size (:func:`compute_profile`,
shared with the runtime's onnxruntime TensorRT provider, lives in :mod:`compir.engines`); and the
fixed shapes int8 calibration runs at."""

from __future__ import annotations

from compir.engines import ShapeRange, compute_profile

__all__ = ["calibration_batch", "calibration_shapes", "compute_profile"]


def calibration_shapes(profile: dict[str, ShapeRange], *, batch: int) -> dict[str, tuple[int, ...]]:
    """The fixed shapes int8 calibration runs at (batch ``batch``, clamped into the profile)."""
    shapes = {}
    for name, shape_range in profile.items():
        size = min(max(batch, shape_range.min[0]), shape_range.max[0])
        shapes[name] = (size, *shape_range.opt[1:])
    return shapes


def calibration_batch(requested: int, *, min_batch: int, max_batch: int) -> int:
    """The batch size int8 calibration feeds: ``requested`` clamped into the profile's batch range.

    The calibration profile (:func:`calibration_shapes`) and the batches handed to the calibrator
    must have the same size: TensorRT reads that many rows from each buffer.
    """
    return min(max(requested, min_batch), max_batch)
