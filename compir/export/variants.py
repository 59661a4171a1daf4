"""Reduced-precision variants of the fp32 graphs: fp16, int8 with dynamic and with static
(calibrated) activation scales. Each variant keeps fp32 inputs and outputs, so the runtime feeds
every variant the same arrays; the manifest still records the dtypes read from each file.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compir.contracts import atomic_output_path
from compir.errors import ContractError

VARIANTS = ("fp32", "fp16", "int8-dynamic", "int8-static")

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
    "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True, "QuantizeBias": False},
}


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and activations, fp32 I/O, numerically sensitive ops kept in fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32))
    _save(converted, target)


def quantize_int8_dynamic(source: Path, target: Path) -> dict[str, Any]:
    """int8 weights (per channel, 7-bit), activation scales computed per batch at run time.

    Returns the recipe (:data:`INT8_DYNAMIC_RECIPE`) for the manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    recipe = INT8_DYNAMIC_RECIPE
    with _preprocessed(source) as prepared, atomic_output_path(target) as tmp:
        quantize_dynamic(
            str(prepared),
            str(tmp),
            weight_type=QuantType[recipe["weight_type"]],
            op_types_to_quantize=list(recipe["op_types_to_quantize"]),
            per_channel=recipe["per_channel"],
            reduce_range=recipe["reduce_range"],
            extra_options=dict(recipe["extra_options"]),
        )
    return dict(recipe)


def quantize_int8_static(source: Path, target: Path, *, calibration: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """int8 weights and activations (symmetric Q/DQ, zero points 0) with scales calibrated on real inputs.

    ``calibration`` is a list of feed dicts (one batch each) of this graph's inputs, e.g. gallery
    images and real modification texts. Returns the recipe (:data:`INT8_STATIC_RECIPE`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ContractError(f"static int8 quantization of {source.name} needs calibration batches; pass --calibration-data")
    recipe = INT8_STATIC_RECIPE
    with _preprocessed(source) as prepared, atomic_output_path(target) as tmp:
        quantize_static(
            str(prepared),
            str(tmp),
            _FeedReader(calibration),
            quant_format=QuantFormat[recipe["quant_format"]],
            op_types_to_quantize=list(recipe["op_types_to_quantize"]),
            per_channel=recipe["per_channel"],
            reduce_range=recipe["reduce_range"],
            activation_type=QuantType[recipe["activation_type"]],
            weight_type=QuantType[recipe["weight_type"]],
            calibrate_method=CalibrationMethod[recipe["calibrate_method"]],
            extra_options=dict(recipe["extra_options"]),
        )
    return {**recipe, "calibration_batches": len(calibration)}


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


class _preprocessed:
    """Symbolic shape inference + graph optimisation before quantization (onnxruntime's advice)."""

    def __init__(self, source: Path) -> None:
        self._source = source
        self._tmp = tempfile.TemporaryDirectory(prefix="compir-quant-")

    def __enter__(self) -> Path:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared = Path(self._tmp.name) / self._source.name
        logging.getLogger("onnxruntime").setLevel(logging.ERROR)
        try:
            quant_pre_process(str(self._source), str(prepared), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference fails on some graphs; plain ONNX inference suffices
            quant_pre_process(str(self._source), str(prepared), skip_symbolic_shape=True)
        return prepared

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def _save(model: onnx.ModelProto, target: Path) -> None:
    with atomic_output_path(target) as tmp:
        onnx.save(model, str(tmp))
