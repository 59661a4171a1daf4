"""Reduced-precision variants of the fp32 graphs: fp16, int8 with dynamic and with static
(calibrated) activation scales. Each variant keeps fp32 inputs and outputs, so the runtime feeds
every variant the same arrays; the manifest still records the dtypes read from each file.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

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

# Graph inputs with integer ids (token ids) are never quantized; only weights of MatMul / Gemm /
# Conv / Attention carry the int8 saving.
_INT8_OPS = ["MatMul", "Gemm", "Conv"]


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and activations, fp32 I/O, numerically sensitive ops kept in fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32))
    _save(converted, target)


def quantize_int8_dynamic(source: Path, target: Path) -> None:
    """int8 weights (per channel), activation scales computed per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _preprocessed(source) as prepared, atomic_output_path(target) as tmp:
        quantize_dynamic(
            str(prepared),
            str(tmp),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],  # ConvInteger has no int8-weight CPU kernel
            per_channel=True,
        )


def quantize_int8_static(source: Path, target: Path, *, calibration: Sequence[dict[str, np.ndarray]]) -> None:
    """int8 weights and activations (QDQ format) with scales calibrated on real inputs.

    ``calibration`` is a list of feed dicts (one batch each) of this graph's inputs, e.g. gallery
    images and real modification texts.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ContractError(f"static int8 quantization of {source.name} needs calibration batches; pass --calibration-data")
    with _preprocessed(source) as prepared, atomic_output_path(target) as tmp:
        quantize_static(
            str(prepared),
            str(tmp),
            _FeedReader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(_INT8_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )


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
