"""Optimization profiles from the manifest's graph shapes: the named ``batch`` axis of every
input gets (min, opt, max) sizes, every other axis keeps its exported size."""

from __future__ import annotations

from compir.engines import ShapeRange
from compir.errors import ContractError
from compir.export.graphs import BATCH_AXIS
from compir.manifest import GraphSpec


def compute_profile(graph: GraphSpec, *, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, ShapeRange]:
    """One ShapeRange per graph input; ContractError on an axis the profile cannot size."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ContractError(f"batch sizes must satisfy 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max ({max_batch})")
    profile: dict[str, ShapeRange] = {}
    for spec in graph.inputs:
        low: list[int] = []
        mid: list[int] = []
        high: list[int] = []
        for axis, dim in enumerate(spec.shape):
            if dim == BATCH_AXIS:
                sizes = (min_batch, opt_batch, max_batch)
            elif isinstance(dim, int) and dim > 0:
                sizes = (dim, dim, dim)
            else:
                raise ContractError(
                    f"{graph.role} input {spec.name!r} axis {axis} is dynamic ({dim!r}) but only {BATCH_AXIS!r} "
                    f"can be given a TensorRT profile; re-export the graph with fixed sizes elsewhere"
                )
            low.append(sizes[0])
            mid.append(sizes[1])
            high.append(sizes[2])
        profile[spec.name] = ShapeRange(min=tuple(low), opt=tuple(mid), max=tuple(high))
    return profile


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
