"""Reduced-precision variants of the fp32 graphs: fp16, int8 with dynamic and with static
(calibrated) activation scales. Each variant keeps fp32 inputs and outputs, so the runtime feeds
every variant the same arrays; the manifest still records the dtypes read from each file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compir.errors import ContractError
from compir.export.external_data import EXTERNAL_DATA_BYTES, external_data_path, has_external_data, save_graph

VARIANTS = ("fp32", "fp16", "int8-dynamic", "int8-static", "int8-static-u8")

# Kept in fp32 inside fp16 graphs: reductions and normalisations overflow or lose the small
# differences they exist to compute (LayerNorm's variance, softmax's sum of exponentials,
# L2 normalisation's sum of squares), and the sigmoid gate of the combiner saturates.
FP16_KEEP_FP32 = (
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "Pow",
    "Sqrt",
    "Div",
    "Erf",
    "Sigmoid",
    "CumSum",
    "ArgMax",
    "Range",
    "TopK",
    # Not for accuracy: onnxruntime's NchwcTransformer (ORT_ENABLE_ALL, the default session
    # level) segfaults on fp16 transformer graphs whose Transpose nodes are fp16.
    "Transpose",
)

# int8 recipes, recorded in the manifest per variant. onnxruntime's x86-64 integer kernels take
# u8 activations and s8 weights (s8 activations are shifted to u8) and, without VNNI (AVX2 only),
# add pairs of u8*s8 products in int16 with saturation (vpmaddubsw): 2 * 255 * 127 overflows
# int16, so full-range weights give wrong sums there (mean cosine 0.92 to fp32 measured on an
# AVX2 Zen 3) and right ones on VNNI. reduce_range quantizes weights to 7 bits (|w| <= 64), and
# 2 * 255 * 64 = 32,640 fits: no saturation on any x86-64 class, by construction, for about one
# bit of weight precision (per-channel scales win most of it back). onnxruntime's own guidance
# for CPUs without VNNI (quantize_static's docstring; quantization docs, "When to use reduce-range").
# Only MatMul / Gemm with constant weights are quantized (MatMulConstBOnly): the attention
# matmuls (query x key, softmax x value) stay fp32, their inputs have no weight to save.
INT8_DYNAMIC_RECIPE: dict[str, Any] = {
    "recipe": "u8s8-7bit-weights",
    "quantizer": "onnxruntime.quantization.quantize_dynamic",
    "op_types_to_quantize": ["MatMul", "Gemm"],  # ConvInteger has no int8-weight CPU kernel
    "weight_type": "QInt8",
    "activation_type": "QUInt8",  # dynamic: per-batch asymmetric u8 (DynamicQuantizeLinear)
    "per_channel": True,
    "reduce_range": True,
    "extra_options": {"MatMulConstBOnly": True, "WeightSymmetric": True},
}
# Static Q/DQ for onnxruntime and TensorRT alike: TensorRT's QuantizeLinear / DequantizeLinear
# accept only int8 with zero zero-points, so activations and weights are symmetric QInt8
# (onnxruntime's recommendation for TensorRT) and biases stay fp32 (QuantizeBias off: an int32
# bias DequantizeLinear is not TensorRT's). Weights again 7-bit for AVX2 (see above).
INT8_STATIC_RECIPE: dict[str, Any] = {
    "recipe": "s8s8-symmetric-qdq-7bit-weights",
    "quantizer": "onnxruntime.quantization.quantize_static",
    "quant_format": "QDQ",
    "op_types_to_quantize": ["MatMul", "Gemm", "Conv"],
    "weight_type": "QInt8",
    "activation_type": "QInt8",
    "per_channel": True,
    "reduce_range": True,
    "calibrate_method": "MinMax",
    "keep_fp32": "MatMul whose second input is not a constant",  # activation_matmuls(): by node name
    "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True, "QuantizeBias": False},
}
# Static Q/DQ for onnxruntime's CPU: its QDQ fusion turns every Conv / MatMul / Gemm / pooling group
# with u8 activations and an int32 bias into QLinearConv / QLinearMatMul / QGemm, while the s8
# activations above leave a third of ResNet-50's convolutions as DequantizeLinear + fp32 Conv
# (measured: RN50 image encoder 2.3x faster than int8-static at 1 thread). u8 activations span
# 0..255 like the shifted s8 ones, so with 7-bit weights no AVX2 int16 pair sum saturates either.
# TensorRT does not parse it (asymmetric u8 zero points): engines take int8-static.
INT8_STATIC_U8_RECIPE: dict[str, Any] = {
    **INT8_STATIC_RECIPE,
    "recipe": "u8s8-qdq-7bit-weights",
    "activation_type": "QUInt8",
    "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True, "MatMulConstBOnly": True, "QuantizeBias": True},
}
STATIC_RECIPES = {"int8-static": INT8_STATIC_RECIPE, "int8-static-u8": INT8_STATIC_U8_RECIPE}


def convert_fp16(source: Path, target: Path, *, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
    """fp16 weights and activations, fp32 I/O, numerically sensitive ops kept in fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))  # with its external data, if any
    # Converted in place (the same tensors): one copy of the graph in memory, not two.
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32))
    del model
    save_graph(converted, target, external_data_bytes=external_data_bytes)


def quantize_int8_dynamic(source: Path, target: Path, *, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict[str, Any]:
    """int8 weights (per channel, 7-bit), activation scales computed per batch at run time.

    Returns the recipe (:data:`INT8_DYNAMIC_RECIPE`) for the manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    recipe = INT8_DYNAMIC_RECIPE
    with _preprocessed(source) as prepared, _written(target, external_data_bytes=external_data_bytes) as tmp:
        quantize_dynamic(
            str(prepared.path),
            str(tmp),
            use_external_data_format=prepared.external,
            weight_type=QuantType[recipe["weight_type"]],
            op_types_to_quantize=list(recipe["op_types_to_quantize"]),
            per_channel=recipe["per_channel"],
            reduce_range=recipe["reduce_range"],
            extra_options=dict(recipe["extra_options"]),
        )
    return dict(recipe)


def quantize_int8_static(
    source: Path,
    target: Path,
    *,
    calibration: Sequence[dict[str, np.ndarray]],
    variant: str = "int8-static",
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
) -> dict[str, Any]:
    """int8 weights and activations (Q/DQ) with scales calibrated on real inputs.

    ``calibration`` is a list of feed dicts (one batch each) of this graph's inputs, e.g. gallery
    images and real modification texts. ``variant``: ``int8-static`` (:data:`INT8_STATIC_RECIPE`,
    symmetric, zero points 0: TensorRT and onnxruntime) or ``int8-static-u8`` (:data:`INT8_STATIC_U8_RECIPE`,
    onnxruntime's CPU).
    Returns the recipe with the number of calibration batches.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ContractError(f"static int8 quantization of {source.name} needs calibration batches; pass --calibration-data")
    recipe = STATIC_RECIPES[variant]
    with _preprocessed(source) as prepared, _written(target, external_data_bytes=external_data_bytes) as tmp:
        excluded = activation_matmuls(prepared.path)
        quantize_static(
            str(prepared.path),
            str(tmp),
            _FeedReader(calibration),
            use_external_data_format=prepared.external,
            quant_format=QuantFormat[recipe["quant_format"]],
            op_types_to_quantize=list(recipe["op_types_to_quantize"]),
            per_channel=recipe["per_channel"],
            reduce_range=recipe["reduce_range"],
            activation_type=QuantType[recipe["activation_type"]],
            weight_type=QuantType[recipe["weight_type"]],
            calibrate_method=CalibrationMethod[recipe["calibrate_method"]],
            nodes_to_exclude=excluded,
            extra_options=dict(recipe["extra_options"]),
        )
    return {**recipe, "calibration_batches": len(calibration)}


def activation_matmuls(path: Path) -> list[str]:
    """The MatMul nodes of the graph at ``path`` whose second input is not a constant (attention's
    query x key and softmax x value, TG-CIR's token-learner pooling): kept fp32 by name.

    ``MatMulConstBOnly`` says this to quantize_static, but its QDQ path (onnxruntime 1.32) quantizes
    them anyway, both inputs as full-range int8 activations. Fused into QLinearMatMul, an AVX2 CPU
    (no VNNI) then adds pairs of u8*s8 products in int16 with saturation (2 * 255 * 127 overflows; the
    7-bit weights that avoid it exist only for constant B): the tiny ResNet + TG-CIR image encoder
    gave mean cosine 0.905 to fp32 on an AVX2 EPYC, 1.000 with these nodes excluded."""
    model = onnx.load(str(path), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] not in constants]


def _feed_reader_base() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class _FeedReader(_feed_reader_base()):  # type: ignore[misc]  # a base resolved at run time keeps onnxruntime a lazy import
    """onnxruntime's CalibrationDataReader over a list of feed dicts."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self._batches = list(batches)
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


@dataclass(frozen=True)
class _Prepared:
    """A prepared graph; ``external``: its weights are in an external data file beside it."""

    path: Path
    external: bool


class _preprocessed:
    """Symbolic shape inference + graph optimisation before quantization (onnxruntime's advice).

    A graph with external data is prepared (and then quantized) with external data too."""

    def __init__(self, source: Path) -> None:
        self._source = source
        self._tmp = tempfile.TemporaryDirectory(prefix="compir-quant-")

    def __enter__(self) -> _Prepared:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared = _Prepared(Path(self._tmp.name) / self._source.name, external=has_external_data(self._source))
        data = external_data_path(prepared.path)
        options = {"save_as_external_data": True, "all_tensors_to_one_file": True, "external_data_location": data.name}
        options = options if prepared.external else {}
        logging.getLogger("onnxruntime").setLevel(logging.ERROR)
        source = str(self._source.resolve())
        # In the scratch folder: a failed symbolic shape inference (the text graphs' dynamic sequence
        # axis) leaves a <uuid>.data file of the graph's weights in the working directory.
        with _working_directory(self._tmp.name):
            try:
                quant_pre_process(source, str(prepared.path), skip_symbolic_shape=False, **options)
            except Exception:  # symbolic shape inference fails on some graphs; plain ONNX inference suffices
                data.unlink(missing_ok=True)
                quant_pre_process(source, str(prepared.path), skip_symbolic_shape=True, **options)
        return prepared

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


@contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """``contextlib.chdir`` (Python 3.11+) for Python 3.10."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def _written(target: Path, *, external_data_bytes: int) -> Iterator[Path]:
    """A scratch path for a quantizer's output, then saved to ``target`` (its external data named
    after ``target``, or none when the quantized graph is small enough)."""
    with tempfile.TemporaryDirectory(prefix="compir-quantized-") as scratch:
        written = Path(scratch) / target.name
        yield written
        save_graph(onnx.load(str(written)), target, external_data_bytes=external_data_bytes)
