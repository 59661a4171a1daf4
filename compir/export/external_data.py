"""ONNX graphs past protobuf's 2 GiB limit: weights in one external data file beside the graph.

A graph whose tensors exceed ``external_data_bytes`` (default :data:`compir.manifest.EXTERNAL_DATA_BYTES`)
is written as ``<role>.onnx`` (the structure) plus ``<role>.onnx.data`` (every tensor over 1 KiB).
onnxruntime and TensorRT's parser read the data file from beside the graph's path; the manifest
records its checksum (:attr:`compir.manifest.GraphSpec.external_data`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from compir.contracts import atomic_output_path
from compir.manifest import EXTERNAL_DATA_BYTES, external_data_path

__all__ = ["EXTERNAL_DATA_BYTES", "external_data_path", "external_files", "has_external_data", "save_graph", "tensor_bytes"]


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's tensors (initializers and Constant values), stored inline or not."""
    return sum(_nbytes(tensor) for tensor in _tensors(model))


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = [*model.graph.initializer]
    return tensors + [attr.t for node in model.graph.node for attr in node.attribute if attr.type == onnx.AttributeProto.TENSOR]


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def save_graph(model: onnx.ModelProto, target: Path, *, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
    """Write ``model`` to ``target``, its tensors into :func:`~compir.manifest.external_data_path` when they exceed ``external_data_bytes``.

    Writing external data moves the tensors out of ``model``: do not use it afterwards."""
    data = external_data_path(target)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_path(target) as tmp:
        if tensor_bytes(model) > external_data_bytes:
            onnx.save_model(
                model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024
            )
        else:
            onnx.save_model(model, str(tmp))


def external_files(model: onnx.ModelProto) -> list[str]:
    """The external data files ``model`` (loaded without them) refers to, relative to its folder."""
    found: dict[str, None] = {}
    for tensor in _tensors(model):
        if uses_external_data(tensor):
            found.setdefault(next(entry.value for entry in tensor.external_data if entry.key == "location"), None)
    return list(found)


def has_external_data(path: Path) -> bool:
    return bool(external_files(onnx.load(str(path), load_external_data=False)))
