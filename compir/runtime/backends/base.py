"""The backend interface: run one graph of an export on numpy arrays.

A backend opens a :class:`GraphSession` per graph role; names, dtypes and shapes come from the
manifest's :class:`compir.manifest.GraphSpec` and are checked against what the session reports
(:func:`check_io`), so a manifest that lies about its graphs is refused when the runtime starts,
not when a query arrives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from compir.errors import ContractError
from compir.manifest import GraphSpec, TensorSpec


class GraphSession(Protocol):
    """One loaded graph. ``run`` maps input name -> array to output name -> array."""

    spec: GraphSpec

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    """Opens graph sessions of one export variant and says what it runs on."""

    name: str

    def open(self, graph: GraphSpec) -> GraphSession: ...

    def info(self) -> dict[str, Any]: ...


def check_io(
    graph: GraphSpec,
    *,
    inputs: Sequence[tuple[str, str, Sequence[int | str | None]]],
    outputs: Sequence[tuple[str, str, Sequence[int | str | None]]],
) -> None:
    """Compare the manifest's tensors with the session's (name, dtype, shape) triples.

    A session dim that is not an int is dynamic. Every manifest tensor must exist with the same
    dtype and rank, and every axis must agree: the same fixed size, or dynamic on both sides
    (e.g. "batch"). Raises ContractError naming graph and tensor.
    """
    for kind, declared, actual in (("input", graph.inputs, inputs), ("output", graph.outputs, outputs)):
        found = {name: (dtype, tuple(shape)) for name, dtype, shape in actual}
        for spec in declared:
            if spec.name not in found:
                raise ContractError(
                    f"{graph.role} graph ({graph.file}): the manifest declares {kind} {spec.name!r} but the graph "
                    f"has {sorted(found)}; re-export the model"
                )
            _check_tensor(graph, kind, spec, *found[spec.name])
        if kind == "input":
            extra = sorted(set(found) - {spec.name for spec in declared})
            if extra:
                raise ContractError(f"{graph.role} graph ({graph.file}): inputs {extra} are missing from the manifest")


def _check_tensor(graph: GraphSpec, kind: str, spec: TensorSpec, dtype: str, shape: tuple[int | str | None, ...]) -> None:
    where = f"{graph.role} graph ({graph.file}), {kind} {spec.name!r}"
    if dtype != spec.dtype:
        raise ContractError(f"{where}: the manifest says {spec.dtype}, the graph has {dtype}")
    if len(shape) != len(spec.shape):
        raise ContractError(f"{where}: the manifest says shape {list(spec.shape)}, the graph has {list(shape)}")
    for axis, (want, have) in enumerate(zip(spec.shape, shape, strict=True)):
        fixed = isinstance(have, int) and not isinstance(have, bool) and have >= 0
        if isinstance(want, int) and fixed and want != have:
            raise ContractError(f"{where}: axis {axis} is {want} in the manifest but {have} in the graph")
        if isinstance(want, str) and fixed:
            raise ContractError(f"{where}: axis {axis} ({want!r}) is dynamic in the manifest but fixed to {have} in the graph")
        if isinstance(want, int) and not fixed:
            raise ContractError(f"{where}: axis {axis} is fixed to {want} in the manifest but dynamic in the graph")


def numpy_dtype(name: str) -> np.dtype:
    """Manifest dtype name -> numpy dtype."""
    return np.dtype("bool" if name == "bool" else name)
