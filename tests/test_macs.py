"""benchmarks/macs.py on graphs whose multiply-accumulates are known by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.macs import count_macs


def _graph(path: Path) -> Path:
    """x (batch, 8) -> MatMul (8, 16) -> Gemm (16, 4) -> y; image (batch, 3, 10, 10) -> Conv 4x3x3x3 -> z (batch, 4, 8, 8)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (8, 16)), ("w2", (16, 4)), ("wc", (4, 3, 3, 3)))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Gemm", ["h", "w2"], ["y"]),
        helper.make_node("Conv", ["image", "wc"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "known",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_counts_matmul_gemm_and_conv_at_the_given_batch(tmp_path: Path) -> None:
    path = _graph(tmp_path / "known.onnx")
    count = count_macs(path, input_shapes={"x": (2, 8), "image": (2, 3, 10, 10)})
    # MatMul 2x8 @ 8x16 = 256; Gemm 2x16 @ 16x4 = 128; Conv: 2 x 4 x 8 x 8 outputs x 3 x 3 x 3 = 13,824
    assert count.by_op == {"MatMul": 256, "Gemm": 128, "Conv": 13_824}
    assert count.macs == 256 + 128 + 13_824 and count.unresolved == ()


def test_int8_dynamic_quantization_keeps_the_count(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = _graph(tmp_path / "known.onnx")
    quantized = tmp_path / "int8.onnx"
    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    count = count_macs(quantized, input_shapes={"x": (2, 8), "image": (2, 3, 10, 10)})
    assert count.macs == 256 + 128 + 13_824 and count.unresolved == ()
    assert set(count.by_op) - {"Conv"} <= {"MatMulInteger", "DynamicQuantizeMatMul", "Gemm", "MatMul"}
    assert "MatMul" not in count.by_op  # the MatMul became an integer product, still counted


def test_names_an_input_the_graph_does_not_have(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no graph input named"):
        count_macs(_graph(tmp_path / "known.onnx"), input_shapes={"x": (1, 8), "image": (1, 3, 10, 10), "nope": (1,)})
