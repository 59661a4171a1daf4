"""The ONNX graphs of an export, declared once: role, wrapper module, input and output names.

Each wrapper calls one traceable method of :class:`compir.train.model.CIRModel`, so the graph is
exactly the training code path. After export, the output shapes are pinned from the traced
outputs (torch's exporter leaves names such as ``Divquery_embeds_dim_1`` on static axes) and the
I/O contract the manifest records is then read back from the ONNX file: one source of truth.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from compir.contracts import atomic_output_path
from compir.errors import ContractError
from compir.export.attention import export_ready
from compir.manifest import COMPOSER, IMAGE_ENCODER, QUERY_ENCODER, TEXT_ENCODER, TensorSpec

BATCH_AXIS = "batch"

_ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


class _Method(nn.Module):
    """One traceable method of the model as a module (what torch.onnx.export traces)."""

    def __init__(self, model: Any, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        result = getattr(self.model, self.method)(*inputs)
        return tuple(result) if isinstance(result, (tuple, list)) else result


@dataclass(frozen=True)
class GraphDef:
    """One graph to export: ``module(*inputs named input_names) -> outputs named output_names``."""

    role: str
    module: nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


# role, CIRModel method, input names, output names (the fixed vocabulary of the manifest).
# query_encoder fuses image encoder, text encoder and composer: one session call per query.
_WRAPPERS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (IMAGE_ENCODER, "encode_image", ("pixel_values",), ("image_embeds", "image_features", "patch_features")),
    (TEXT_ENCODER, "encode_text", ("input_ids",), ("text_embeds", "text_features", "token_features")),
    (COMPOSER, "compose", ("image_features", "text_features"), ("query_embeds",)),
    (QUERY_ENCODER, "encode_query", ("pixel_values", "input_ids"), ("query_embeds",)),
)
GRAPH_ORDER = tuple(role for role, *_ in _WRAPPERS)


def graph_defs(model: Any) -> list[GraphDef]:
    """The four graphs of a CIR model (in :data:`GRAPH_ORDER`), each wrapping the model in eval mode."""
    model.eval()
    return [
        GraphDef(role=role, module=_Method(model, method).eval(), input_names=inputs, output_names=outputs)
        for role, method, inputs, outputs in _WRAPPERS
    ]


def run_torch(defn: GraphDef, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a graph's torch module on numpy feeds; returns outputs by name (float32 numpy)."""
    args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in defn.input_names]
    with torch.no_grad():
        result = defn.module(*args)
    outputs = result if isinstance(result, tuple) else (result,)
    if len(outputs) != len(defn.output_names):
        raise ContractError(
            f"{defn.role}: the model returned {len(outputs)} outputs, the export contract names "
            f"{len(defn.output_names)} ({', '.join(defn.output_names)})"
        )
    return {name: out.detach().float().numpy() for name, out in zip(defn.output_names, outputs, strict=True)}


def export_graph(defn: GraphDef, *, feeds: dict[str, np.ndarray], path: Path, opset: int) -> None:
    """Trace ``defn`` on ``feeds`` (batch > 1) into ``path`` with a dynamic ``batch`` axis everywhere."""
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in defn.input_names)
    axes = {name: {0: BATCH_AXIS} for name in (*defn.input_names, *defn.output_names)}
    static_shapes = {name: out.shape for name, out in run_torch(defn, feeds).items()}
    with atomic_output_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated but traces open_clip's models robustly (the
        # dynamo exporter trips over data-dependent argmax pooling on some torch releases).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            export_ready(defn.module),  # parity is then checked against the unmodified module
            args,
            str(tmp),
            input_names=list(defn.input_names),
            output_names=list(defn.output_names),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        model = onnx.load(str(tmp))
        _pin_output_shapes(model, static_shapes)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))


def _pin_output_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Axis 0 of every output is ``batch``; the others are the traced (fixed) sizes."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        expected = shapes[output.name]
        if len(dims) != len(expected):
            raise ContractError(f"graph output {output.name!r}: rank {len(dims)} in ONNX, {len(expected)} in torch")
        for axis, dim in enumerate(dims):
            if axis == 0:
                dim.dim_param = BATCH_AXIS
            else:
                dim.dim_value = int(expected[axis])


def read_io(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs (name, dtype, shape with named dynamic axes) from the file."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_spec(v, path) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, path) for v in model.graph.output)
    return inputs, outputs


def _spec(value: onnx.ValueInfoProto, path: Path) -> TensorSpec:
    tensor = value.type.tensor_type
    if tensor.elem_type not in _ONNX_DTYPES:
        raise ContractError(f"{path}: tensor {value.name!r} has unsupported element type {tensor.elem_type}")
    shape: list[int | str] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.dim_param:
            shape.append(str(dim.dim_param))
        else:
            raise ContractError(f"{path}: tensor {value.name!r} has an unnamed dynamic axis")
    return TensorSpec(name=value.name, dtype=_ONNX_DTYPES[tensor.elem_type], shape=tuple(shape))


def graph_inputs(role: str, *, pixel_values: np.ndarray, input_ids: np.ndarray, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds of graph ``role`` for a batch of real images / token ids (features from the encoders)."""
    pool = {"pixel_values": pixel_values, "input_ids": input_ids, **features}
    names = next(inputs for r, _, inputs, _ in _WRAPPERS if r == role)
    return {name: pool[name] for name in names}


def select_batch(feeds: dict[str, np.ndarray], indices: Sequence[int]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(array[list(indices)]) for name, array in feeds.items()}
