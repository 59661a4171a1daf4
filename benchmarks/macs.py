"""Multiply-accumulates of an ONNX graph, counted from its GEMM-type nodes after shape inference.

Counted: MatMul, Gemm, Conv and their integer forms (MatMulInteger, QLinearMatMul,
DynamicQuantizeMatMul, ConvInteger, QLinearConv). Each node's MACs come from its output shape and
its reduction length: ``prod(output) * K`` for a matrix product (K: A's last axis; Gemm honours
``transA``), ``prod(output) * prod(W.shape[1:])`` for a convolution. Everything else (attention's
softmax, LayerNorm, GELU, adds) is left out: it is what the GEMMs' rate does not show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MATMULS = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "DynamicQuantizeMatMul": 0}  # op -> A's input
CONVS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> W's input


@dataclass(frozen=True)
class MacCount:
    macs: int  # multiply-accumulates of the counted nodes
    by_op: dict[str, int]
    unresolved: tuple[str, ...]  # GEMM-type nodes whose shapes inference left open (not counted)


def count_macs(path: str | Path, *, input_shapes: Mapping[str, tuple[int, ...]]) -> MacCount:
    """MACs of the graph at ``path`` with its inputs fixed to ``input_shapes`` (every input named;
    e.g. ``{"pixel_values": (1, 3, 224, 224)}``). Weights stored as external data are not read."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for graph_input in model.graph.input:
        if graph_input.name not in input_shapes:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        shape = input_shapes[graph_input.name]
        if len(dims) != len(shape):
            raise ValueError(f"{path}: input {graph_input.name!r} has {len(dims)} axes, got shape {shape}")
        for dim, size in zip(dims, shape, strict=True):
            dim.dim_value = int(size)
    unknown = set(input_shapes) - {i.name for i in model.graph.input}
    if unknown:
        raise ValueError(f"{path}: no graph input named {sorted(unknown)}")
    del model.graph.value_info[:]  # the export's symbolic shapes: inferred again from the fixed inputs
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shapes(inferred)
    by_op: dict[str, int] = {}
    unresolved: list[str] = []
    for node in _nodes(inferred.graph):
        macs = _node_macs(node, shapes)
        if macs is None:
            if node.op_type in MATMULS or node.op_type in CONVS or node.op_type == "Gemm":
                unresolved.append(node.name or node.op_type)
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
    return MacCount(macs=sum(by_op.values()), by_op=by_op, unresolved=tuple(unresolved))


def _nodes(graph: Any) -> list[Any]:
    """Every node, those of subgraphs (If / Loop bodies) included."""
    found = []
    for node in graph.node:
        found.append(node)
        for attribute in node.attribute:
            if attribute.g.node:
                found.extend(_nodes(attribute.g))
    return found


def _shapes(model: Any) -> dict[str, tuple[int, ...] | None]:
    """Tensor name -> static shape (None where an axis stayed symbolic)."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = info.type.tensor_type.shape.dim
        static = tuple(d.dim_value for d in dims)
        shapes[info.name] = static if all(d.HasField("dim_value") for d in dims) else None
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def _node_macs(node: Any, shapes: Mapping[str, tuple[int, ...] | None]) -> int | None:
    out = shapes.get(node.output[0]) if node.output else None
    if node.op_type in MATMULS:
        a = shapes.get(node.input[MATMULS[node.op_type]])
        return math.prod(out) * a[-1] if out is not None and a else None
    if node.op_type == "Gemm":
        a = shapes.get(node.input[0])
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        return math.prod(out) * a[0 if trans_a else 1] if out is not None and a is not None and len(a) == 2 else None
    if node.op_type in CONVS:
        w = shapes.get(node.input[CONVS[node.op_type]])
        return math.prod(out) * math.prod(w[1:]) if out is not None and w else None
    return None
