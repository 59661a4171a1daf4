"""The ONNX graphs of an export, declared once: role, wrapper module, input and output names.

Each wrapper calls one traceable method of :class:`compir.train.model.CIRModel`, so the graph is
exactly the training code path. After export, the output shapes are pinned from the traced
outputs (torch's exporter leaves names such as ``Divquery_embeds_dim_1`` on static axes) and the
I/O contract the manifest records is then read back from the ONNX file: one source of truth.

The token axis of ``input_ids`` and ``token_features`` is the named ``sequence`` axis where the
text tower gives the same text outputs on input cut after its longest text
(:meth:`compir.train.model.CIRModel.text_length_cuttable`), so the runtime runs short texts at
their length; every other tower keeps its fixed context length.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from compir.contracts import sha256_file
from compir.errors import ContractError
from compir.export.attention import export_ready
from compir.export.external_data import EXTERNAL_DATA_BYTES, external_files, save_graph
from compir.export.trt.forms import float_bodies
from compir.manifest import (
    BATCH_AXIS,
    COMPOSER,
    IMAGE_ENCODER,
    PROMPT_ENCODER,
    QUERY_ENCODER,
    SEQUENCE_AXIS,
    TEXT_ENCODER,
    TOKEN_MAPPER,
    DataFileSpec,
    GraphSpec,
    TensorSpec,
)

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
    """One graph to export: ``module(*inputs named input_names) -> outputs named output_names``;
    ``sequence_names``: the tensors whose axis 1 is the dynamic ``sequence`` axis (text tokens)."""

    role: str
    module: nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    sequence_names: tuple[str, ...] = ()


# role, CIRModel method, input names, output names (the fixed vocabulary of the manifest).
# query_encoder fuses image encoder, text encoder and composer: one session call per query.
_WRAPPERS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (IMAGE_ENCODER, "encode_image", ("pixel_values",), ("image_embeds", "image_features", "patch_features")),
    (TEXT_ENCODER, "encode_text", ("input_ids",), ("text_embeds", "text_features", "token_features")),
    (COMPOSER, "compose", ("image_features", "text_features"), ("query_embeds",)),
    (QUERY_ENCODER, "encode_query", ("pixel_values", "input_ids"), ("query_embeds",)),
    # zero-shot (textual inversion) in place of the composer: the reference's pseudo token, then the prompt
    # (its ``input_ids`` hold the placeholder once) read with it
    (TOKEN_MAPPER, "map_image", ("image_features",), ("pseudo_tokens",)),
    (PROMPT_ENCODER, "encode_prompt", ("input_ids", "pseudo_tokens"), ("query_embeds",)),
)
GRAPH_ORDER = tuple(role for role, *_ in _WRAPPERS)
_ZERO_SHOT_GRAPHS = (IMAGE_ENCODER, TEXT_ENCODER, TOKEN_MAPPER, PROMPT_ENCODER)
_COMPOSER_GRAPHS = (IMAGE_ENCODER, TEXT_ENCODER, COMPOSER, QUERY_ENCODER)
_TOKEN_TENSORS = ("input_ids", "token_features")  # (B, L) ids and (B, L, Wt) states: axis 1 is the text's length


def graph_defs(model: Any, *, fused: bool = True) -> list[GraphDef]:
    """The graphs of a CIR model (in :data:`GRAPH_ORDER`), each wrapping the model in eval mode;
    ``fused=False`` leaves out the fused ``query_encoder``. Token tensors get the ``sequence`` axis
    where the model's text tower allows cutting (``model.text_length_cuttable``). A zero-shot model
    (a textual-inversion head) has ``token_mapper`` and ``prompt_encoder`` in place of the composer."""
    model.eval()
    cuttable = bool(getattr(model, "text_length_cuttable", False))
    zero_shot = bool(getattr(model.head, "textual_inversion", False))
    if zero_shot and fused:
        raise ContractError("a zero-shot (textual-inversion) export has no fused query_encoder graph: its prompt is filled "
                            "from a template at query time; export without --fused")
    roles = _ZERO_SHOT_GRAPHS if zero_shot else _COMPOSER_GRAPHS
    return [
        GraphDef(
            role=role,
            module=_Method(model, method).eval(),
            input_names=inputs,
            output_names=outputs,
            sequence_names=tuple(n for n in (*inputs, *outputs) if n in _TOKEN_TENSORS) if cuttable else (),
        )
        for role, method, inputs, outputs in _WRAPPERS
        if role in roles and (fused or role != QUERY_ENCODER)
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


def export_graph(
    defn: GraphDef, *, feeds: dict[str, np.ndarray], path: Path, opset: int, external_data_bytes: int = EXTERNAL_DATA_BYTES
) -> None:
    """Trace ``defn`` on ``feeds`` (batch > 1) into ``path`` with a dynamic ``batch`` axis everywhere
    (and the ``sequence`` axis on ``defn.sequence_names``).

    Weights past ``external_data_bytes`` go to an external data file beside ``path``
    (:mod:`compir.export.external_data`); the check reads the written files, so no second copy of
    the graph is held in memory for it."""
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in defn.input_names)
    axes = {
        name: {0: BATCH_AXIS, 1: SEQUENCE_AXIS} if name in defn.sequence_names else {0: BATCH_AXIS}
        for name in (*defn.input_names, *defn.output_names)
    }
    static_shapes = {name: out.shape for name, out in run_torch(defn, feeds).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # A folder of its own: past 2 GiB torch writes one external file per tensor beside the graph.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch, warnings.catch_warnings():
        traced = Path(scratch) / path.name
        # The TorchScript exporter is deprecated but traces open_clip's models robustly (the
        # dynamo exporter trips over data-dependent argmax pooling on some torch releases).
        warnings.simplefilter("ignore")
        # Parity is then checked against the unmodified module.
        module: nn.Module = export_ready(defn.module, dynamic_length=bool(defn.sequence_names))
        if any(isinstance(part, torch.jit.ScriptModule) for part in module.modules()):
            # A scripted part (a loop over a dynamic axis) is exported from a trace that holds it.
            module = torch.jit.trace(module, args)
        torch.onnx.export(
            module,
            args,
            str(traced),
            input_names=list(defn.input_names),
            output_names=list(defn.output_names),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        model = onnx.load(str(traced))
    float_bodies(model)  # TensorRT takes CumSum and NonZero on floats only (HF text towers feed them ints, bools)
    _pin_output_shapes(model, static_shapes, sequence_names=defn.sequence_names)
    save_graph(model, path, external_data_bytes=external_data_bytes)
    del model
    onnx.checker.check_model(str(path))  # by path: works past 2 GiB and with external data


def _pin_output_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], *, sequence_names: tuple[str, ...] = ()) -> None:
    """Axis 0 of every output is ``batch``, axis 1 of ``sequence_names`` ``sequence``; the others are the traced (fixed) sizes."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        expected = shapes[output.name]
        if len(dims) != len(expected):
            raise ContractError(f"graph output {output.name!r}: rank {len(dims)} in ONNX, {len(expected)} in torch")
        for axis, dim in enumerate(dims):
            if axis == 0:
                dim.dim_param = BATCH_AXIS
            elif axis == 1 and output.name in sequence_names:
                dim.dim_param = SEQUENCE_AXIS
            else:
                dim.dim_value = int(expected[axis])


def read_io(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs (name, dtype, shape with named dynamic axes) from the file."""
    return _io(onnx.load(str(path), load_external_data=False), path)


def _io(model: onnx.ModelProto, path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_spec(v, path) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, path) for v in model.graph.output)
    return inputs, outputs


def graph_spec(role: str, path: Path, *, root: Path) -> GraphSpec:
    """The manifest entry of the graph file at ``path`` (under the export folder ``root``): its I/O
    contract, checksum and the checksums of its external data files."""
    model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = _io(model, path)
    data = [path.parent / name for name in external_files(model)]
    return GraphSpec(
        role=role,
        file=path.relative_to(root).as_posix(),
        sha256=sha256_file(path),
        inputs=inputs,
        outputs=outputs,
        external_data=tuple(DataFileSpec(file=f.relative_to(root).as_posix(), sha256=_data_sha256(f, graph=path)) for f in data),
    )


def _data_sha256(path: Path, *, graph: Path) -> str:
    if not path.is_file():
        raise ContractError(f"{graph} refers to external data {path.name} that is not beside it")
    return sha256_file(path)


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


def graph_inputs(
    role: str, *, pixel_values: np.ndarray, input_ids: np.ndarray, features: dict[str, np.ndarray], prompt_ids: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The feeds of graph ``role`` for a batch of real images / token ids (features from the encoders;
    the prompt encoder's ``input_ids`` are ``prompt_ids``: the texts filled into the prompt template)."""
    ids = prompt_ids if role == PROMPT_ENCODER else input_ids
    if ids is None:
        raise ContractError(f"the {role} graph's input_ids are prompts (the template filled with the texts); none were given")
    pool = {"pixel_values": pixel_values, "input_ids": ids, **features}
    names = next(inputs for r, _, inputs, _ in _WRAPPERS if r == role)
    return {name: pool[name] for name in names}


def select_batch(feeds: dict[str, np.ndarray], indices: Sequence[int]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(array[list(indices)]) for name, array in feeds.items()}
