"""A TensorRT ONNX-parser lint: every node of an ONNX graph that TensorRT 10.x's parser would refuse
or handle only with restrictions, checked without TensorRT (pure onnx).

The facts are data (:mod:`compir.export.trt.parser_rules`, ``parser_rules.json``): the operator
matrix of onnx-tensorrt's ``docs/operators.md`` (op, types, restrictions) for the recorded
releases (10.3, which JetPack 6.1/6.2 ships, and the current 10.x). This module only applies them:
op and opset, the types of each node's inputs, the restrictions of the ops compir's graphs contain,
and the graph's dynamic axes against the optimization profile ``compir export engine`` builds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from compir.engines import ShapeRange
from compir.export.trt.parser_rules import ParserRules, Restriction, in_range, load_rules
from compir.manifest import BATCH_AXIS, SEQUENCE_AXIS

_DEFAULT_DOMAINS = ("", "ai.onnx")
# ONNX element type names -> the matrix's names (the others keep ONNX's name and are not TensorRT types).
_TYPE_NAMES = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "FLOAT8E4M3FN": "FP8", "FLOAT4E2M1": "FP4"}


@dataclass(frozen=True)
class Finding:
    """One node (or graph input) TensorRT's parser would refuse or restrict, under which rule."""

    node: str  # node name (``loop/body/name`` inside a subgraph), ``input:<name>`` or ``graph``
    op: str
    rule: str  # the rule's id: ``op-unsupported``, ``input-type``, ``zero-point``, ``dynamic-shape``, ...
    message: str
    releases: tuple[str, ...]  # the TensorRT releases it holds for
    source: str  # where the rule was read: a key of parser_rules.json's ``sources``

    def line(self) -> str:
        return f"{self.node} ({self.op}): [{self.rule}] {self.message} (TensorRT {', '.join(self.releases)}; {self.source})"


def lint_graph(
    model: onnx.ModelProto | str | Path,
    *,
    profile: Mapping[str, ShapeRange] | None = None,
    releases: Sequence[str] | None = None,
    rules: ParserRules | None = None,
) -> list[Finding]:
    """Every finding of ``model`` (a ModelProto or an .onnx path) for each release in ``releases``
    (default: every release the rules record); one Finding per node and rule, naming the releases
    it holds for. ``profile``: the optimization profile the engine would be built with (input ->
    ShapeRange); without it only the named ``batch`` / ``sequence`` axes count as sizable."""
    rules = rules or load_rules()
    chosen = list(releases) if releases is not None else list(rules.releases)
    for release in chosen:
        if release not in rules.releases:
            raise ValueError(f"no TensorRT parser rules for release {release!r}; recorded: {', '.join(rules.releases)}")
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - inference is a help for the type checks, not a requirement
        pass
    merged: dict[tuple[str, str, str, str, str], list[str]] = {}
    for release in chosen:
        for node, op, rule, message, source in _release_findings(proto, release, profile, rules):
            merged.setdefault((node, op, rule, message, source), []).append(release)
    return [Finding(node=k[0], op=k[1], rule=k[2], message=k[3], source=k[4], releases=tuple(v)) for k, v in merged.items()]


_Raw = tuple[str, str, str, str, str]  # node, op, rule, message, source key


class _Scope:
    """Types, shapes and constant values visible in a graph (outer scopes included for subgraphs)."""

    def __init__(self, graph: onnx.GraphProto, outer: _Scope | None = None) -> None:
        self.types: dict[str, int] = dict(outer.types) if outer else {}
        self.shapes: dict[str, list[int | str | None]] = dict(outer.shapes) if outer else {}
        self.constants: dict[str, onnx.TensorProto] = dict(outer.constants) if outer else {}
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type"):
                self.types[info.name] = info.type.tensor_type.elem_type
                if info.type.tensor_type.HasField("shape"):
                    self.shapes[info.name] = [_dim(d) for d in info.type.tensor_type.shape.dim]
        for tensor in graph.initializer:
            self.types[tensor.name], self.shapes[tensor.name] = tensor.data_type, list(tensor.dims)
            self.constants[tensor.name] = tensor
        for node in graph.node:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
            if node.op_type == "Constant" and value is not None:
                self.types[node.output[0]], self.shapes[node.output[0]] = value.data_type, list(value.dims)
                self.constants[node.output[0]] = value

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


def type_name(elem_type: int) -> str:
    """ONNX element type -> the matrix's name (FP32, FP16, BF16, INT64, BOOL, ...)."""
    name = onnx.TensorProto.DataType.Name(elem_type)
    return _TYPE_NAMES.get(name, name)


def _release_findings(model: onnx.ModelProto, release: str, profile: Mapping[str, ShapeRange] | None, rules: ParserRules) -> Iterator[_Raw]:
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    low, high = rules.opset_range(release)
    if opset is not None and not low <= opset <= high:
        yield "graph", "-", "opset", f"opset {opset} is outside the parsed range {low}..{high}", rules.releases[release]["source"]
    yield from _dynamic_shapes(model.graph, profile, rules)
    yield from _tensor_types(model.graph, rules)
    yield from _graph_findings(model.graph, _Scope(model.graph), opset or high, release, rules, prefix="")


def _dynamic_shapes(graph: onnx.GraphProto, profile: Mapping[str, ShapeRange] | None, rules: ParserRules) -> Iterator[_Raw]:
    source = rules.dynamic_shapes["source"]
    initializers = {t.name for t in graph.initializer}
    for info in graph.input:
        if info.name in initializers:
            continue
        dims = [_dim(d) for d in info.type.tensor_type.shape.dim]
        where = f"input:{info.name}"
        if profile is not None and info.name not in profile:
            yield where, "-", "dynamic-shape", "the optimization profile has no entry for this input", source
            continue
        shape_range = profile[info.name] if profile is not None else None
        if shape_range is not None and len(shape_range.min) != len(dims):
            yield where, "-", "dynamic-shape", f"rank {len(dims)} but the profile's shapes have rank {len(shape_range.min)}", source
            continue
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                if shape_range is not None and not shape_range.min[axis] == shape_range.max[axis] == dim:
                    yield where, "-", "dynamic-shape", f"axis {axis} is fixed at {dim} but the profile gives it " \
                        f"{shape_range.min[axis]}..{shape_range.max[axis]}", source
            elif dim not in (BATCH_AXIS, SEQUENCE_AXIS):
                yield where, "-", "dynamic-shape", f"axis {axis} is dynamic ({dim or 'unnamed'}) and no profile sizes it: " \
                    f"only {BATCH_AXIS!r} and {SEQUENCE_AXIS!r} are", source


def _tensor_types(graph: onnx.GraphProto, rules: ParserRules) -> Iterator[_Raw]:
    supported = rules.data_types["supported"]
    infos = [*graph.input, *graph.output, *graph.value_info]
    values = [(v.name, v.type.tensor_type.elem_type) for v in infos if v.type.HasField("tensor_type")]
    for name, elem_type in [*values, *((t.name, t.data_type) for t in graph.initializer)]:
        if elem_type and type_name(elem_type) not in supported:
            yield f"tensor:{name}", "-", "tensor-type", f"{type_name(elem_type)} is not a TensorRT data type", rules.data_types["source"]


def _graph_findings(graph: onnx.GraphProto, scope: _Scope, opset: int, release: str, rules: ParserRules, *, prefix: str) -> Iterator[_Raw]:
    for index, node in enumerate(graph.node):
        name = prefix + (node.name or f"{node.op_type}#{index}")
        for rule, message, source in _node_findings(node, scope, opset, release, rules):
            yield name, node.op_type, rule, message, source
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                inner = _Scope(attribute.g, scope)
                yield from _graph_findings(attribute.g, inner, opset, release, rules, prefix=f"{name}/{attribute.name}/")


def _node_findings(node: onnx.NodeProto, scope: _Scope, opset: int, release: str, rules: ParserRules) -> Iterator[tuple[str, str, str]]:
    operator = rules.operators.get(node.op_type) if node.domain in _DEFAULT_DOMAINS else None
    source = rules.operators_source
    if operator is None:
        domain = node.domain or "ai.onnx"
        yield "op-unsupported", f"{domain}.{node.op_type} is not in TensorRT's operator matrix (it needs a plugin)", source
        return
    if not operator.supported:
        yield "op-unsupported", f"{node.op_type} is not supported by TensorRT's ONNX parser", source
        return
    if not in_range(release, since=operator.since, until=None):
        yield "op-unsupported", f"{node.op_type} is parsed only from TensorRT {operator.since}", "changelog"
        return
    allowed = operator.types_at(release)
    for input_name in _typed_inputs(node, opset, operator.type_param):
        found = scope.types.get(input_name)
        if found is None:
            continue
        kind = type_name(found)
        kind = "FP32" if kind == "DOUBLE" else kind  # cast down to float by the parser (limited support)
        if kind not in allowed:
            yield "input-type", f"input {input_name!r} is {kind}; the parser takes {', '.join(allowed)}", source
    for rule in rules.restrictions:
        if node.op_type in rule.ops and rule.applies(release):
            problem = _CHECKS[rule.check](node, scope, rule)
            if problem:
                yield rule.id, f"{problem} ({rule.text})", rule.source


def _typed_inputs(node: onnx.NodeProto, opset: int, type_param: str | None) -> list[str]:
    """The node's inputs that the matrix's type column is about: those of the schema's first type parameter."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return []
    formal = list(schema.inputs)
    if not formal:
        return []
    param = type_param or formal[0].type_str
    chosen = []
    for position, name in enumerate(node.input):
        spec = formal[min(position, len(formal) - 1)]
        if name and spec.type_str == param:
            chosen.append(name)
    return list(dict.fromkeys(chosen))  # an input fed twice (x @ x) is one finding


def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _check_constant_input(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    name = _input(node, int(rule.params["input"]))
    if not name:
        return ""
    value = scope.value(name)
    if value is None:
        return f"input {name!r} is computed at run time"
    if node.op_type == "Dropout" and bool(np.any(value)):
        return "is_training is True"
    return ""


def _check_zero_input(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    name = _input(node, int(rule.params["input"]))
    value = scope.value(name) if name else None
    if value is None:  # absent (zero by default), or not a constant (then that is the finding)
        return _check_constant_input(node, scope, rule)
    nonzero = value[value != 0]
    return f"zero point {name!r} holds {nonzero.flat[0]} (of {value.size} values)" if nonzero.size else ""


def _check_attribute_in(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    value = _attribute(node, rule.params["attribute"], rule.params["default"])
    return "" if value in rule.params["allowed"] else f"{rule.params['attribute']}={value!r}"


def _check_input_below(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    value = scope.value(_input(node, int(rule.params["input"])))
    limit = int(rule.params["limit"])
    return f"input {rule.params['input']} is {int(value.max())}" if value is not None and value.size and value.max() >= limit else ""


def _check_all_ones(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    value = _attribute(node, rule.params["attribute"], [])
    return f"{rule.params['attribute']}={list(value)}" if any(v != 1 for v in value) else ""


def _check_kernel_rank(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    kernel = _attribute(node, "kernel_shape", [])
    return f"a {len(kernel)}D kernel" if kernel and len(kernel) not in rule.params["allowed"] else ""


def _check_first_output_only(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    extra = [name for name in node.output[1:] if name]
    return f"outputs {extra} are used" if extra else ""


def _check_attribute_absent(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    present = [a.name for a in node.attribute if a.name in rule.params["attributes"]]
    return f"has {', '.join(present)}" if present else ""


def _check_input_rank(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    shape = scope.shapes.get(_input(node, int(rule.params["input"])))
    return f"input rank {len(shape)}" if shape is not None and len(shape) not in rule.params["allowed"] else ""


def _check_einsum_plain(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    equation = str(_attribute(node, "equation", "")).replace(" ", "")
    operands = equation.split("->")[0].split(",")
    if "..." in equation:
        return f"equation {equation!r} has an ellipsis"
    if any(len(set(term)) != len(term) for term in operands):
        return f"equation {equation!r} takes a diagonal"
    sizes: dict[str, set[int]] = {}
    for term, name in zip(operands, node.input, strict=False):
        for label, dim in zip(term, scope.shapes.get(name) or [], strict=False):
            if isinstance(dim, int):
                sizes.setdefault(label, set()).add(dim)
    broadcast = sorted(label for label, seen in sizes.items() if len(seen) > 1)
    return f"equation {equation!r} broadcasts label(s) {broadcast}" if broadcast else ""


def _check_loop_static_scan(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    body = _attribute(node, "body")
    carried = len(node.input) - 2
    scans = len(body.output) - 1 - carried
    if scans <= 0:
        return ""
    trip = _input(node, 0)
    return "" if trip and scope.value(trip) is not None else f"{scans} scan output(s) with a trip count computed at run time"


def _check_loop_carried_shape(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    body = _attribute(node, "body")
    inner = _Scope(body, scope)
    for before, after in zip(body.input[2:], body.output[1:], strict=False):
        old, new = inner.shapes.get(before.name), inner.shapes.get(after.name)
        if old is None or new is None:
            continue
        if len(old) != len(new) or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(old, new, strict=True)):
            return f"carried {before.name!r} goes from shape {old} to {new}"
    return ""


def _check_if_branch_rank(node: onnx.NodeProto, scope: _Scope, rule: Restriction) -> str:
    ranks = []
    for branch in ("then_branch", "else_branch"):
        graph = _attribute(node, branch)
        ranks.append([len(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape") else None for o in graph.output])
    differ = [i for i, (a, b) in enumerate(zip(*ranks, strict=False)) if a is not None and b is not None and a != b]
    return f"output(s) {differ} differ in rank between the branches" if differ else ""


_CHECKS = {
    "constant_input": _check_constant_input,
    "zero_input": _check_zero_input,
    "attribute_in": _check_attribute_in,
    "input_below": _check_input_below,
    "all_ones": _check_all_ones,
    "kernel_rank": _check_kernel_rank,
    "first_output_only": _check_first_output_only,
    "attribute_absent": _check_attribute_absent,
    "input_rank": _check_input_rank,
    "einsum_plain": _check_einsum_plain,
    "loop_static_scan": _check_loop_static_scan,
    "loop_carried_shape": _check_loop_carried_shape,
    "if_branch_rank": _check_if_branch_rank,
}
