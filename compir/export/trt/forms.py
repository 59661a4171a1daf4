"""Rewrites of an exported graph into forms TensorRT's ONNX parser takes, with identical results
(the parity checks against torch run on the rewritten graph)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

_NON_FLOAT = (TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL)
# Ops whose TensorRT types are float only (parser_rules.json) but which exported text towers feed
# integers or booleans -> whether the output is cast back to the input's type.
# CumSum: Hugging Face RoBERTa-style position ids, the cumulative sum of the int32 padding mask
# (sums of 0/1 over a sequence are exact in float32, up to 2**24). NonZero: BERT's traced mask
# checks on booleans (a 0/1 float is non-zero exactly where the boolean is true; its output is
# INT64 indices either way).
_FLOAT_BODIES = {"CumSum": True, "NonZero": False}


def float_bodies(model: onnx.ModelProto) -> int:
    """Feed each integer / boolean CumSum or NonZero a float copy of its input (Cast -> op, and
    Cast back where the output carries the input's type); returns how many nodes changed."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without types nothing is rewritten (the lint still reports it)
        return 0
    infos = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    types = {info.name: info.type.tensor_type.elem_type for info in infos}
    nodes, count = [], 0
    for node in model.graph.node:
        elem = types.get(node.input[0]) if node.op_type in _FLOAT_BODIES else None
        if elem not in _NON_FLOAT:
            nodes.append(node)
            continue
        source = node.input[0]
        node.input[0] = f"{source}_as_float"
        nodes += [helper.make_node("Cast", [source], [node.input[0]], name=f"{node.name}_to_float", to=TensorProto.FLOAT), node]
        if _FLOAT_BODIES[node.op_type]:
            target = node.output[0]
            node.output[0] = f"{target}_as_float"
            nodes.append(helper.make_node("Cast", [node.output[0]], [target], name=f"{node.name}_back", to=elem))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count
