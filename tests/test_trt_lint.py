"""The TensorRT parser lint: one hand-built graph per rule kind that it must flag (and the form of
each that it must pass), a clean graph, the rules file itself, and every variant of the fixture
export (the TensorRT variants clean; the onnxruntime-only ones flagged for what TensorRT refuses)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compir.engines import ShapeRange
from compir.export.trt.lint import Finding, lint_graph
from compir.export.trt.parser_rules import load_rules

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, *, initializers=(), opset: int = 17, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=imports)


def _tensor(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _rules(findings: list[Finding]) -> dict[str, tuple[str, ...]]:
    return {f.rule: f.releases for f in findings}


def _unary(op: str, elem: int = FLOAT, shape=("batch", 8), **attrs) -> onnx.ModelProto:
    return _model([helper.make_node(op, ["x"], ["y"], name="n", **attrs)], [_tensor("x", elem, shape)], [_tensor("y", elem, None)])


def test_a_clean_graph_of_compirs_ops_passes() -> None:
    """Token ids [batch, sequence]: Gather and Slice along the dynamic sequence axis, ArgMax over the
    INT64 ids (CLIP's end-of-text pooling), MatMul, LayerNormalization and Softmax in fp32."""
    weight = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    starts, ends, axes = (numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s", 0), ("e", 4), ("a", 1)))
    scale, bias = numpy_helper.from_array(np.ones(8, np.float32), "scale"), numpy_helper.from_array(np.zeros(8, np.float32), "bias")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["tokens"], name="embed", axis=0),
        helper.make_node("Slice", ["tokens", "s", "e", "a"], ["head"], name="first_tokens"),
        helper.make_node("ArgMax", ["ids"], ["eot"], name="eot", axis=1, keepdims=0),
        helper.make_node("MatMul", ["head", "w"], ["mixed"], name="proj"),
        helper.make_node("LayerNormalization", ["mixed", "scale", "bias"], ["normed"], name="ln", axis=-1),
        helper.make_node("Softmax", ["normed"], ["probs"], name="softmax", axis=-1),
    ]
    table = numpy_helper.from_array(np.ones((100, 8), np.float32), "table")
    model = _model(nodes, [_tensor("ids", INT64, ("batch", "sequence"))], [_tensor("probs", FLOAT, None), _tensor("eot", INT64, None)],
                   initializers=[weight, starts, ends, axes, scale, bias, table])
    profile = {"ids": ShapeRange(min=(1, 1), opt=(8, 20), max=(64, 77))}
    assert lint_graph(model, profile=profile) == []


def test_an_unsupported_op_and_a_custom_domain_op_are_flagged() -> None:
    nodes = [helper.make_node("MatMulInteger", ["a", "b"], ["c"], name="mmi"),
             helper.make_node("FusedMatMul", ["x", "x"], ["y"], name="fused", domain="com.microsoft")]
    model = _model(nodes, [_tensor("a", TensorProto.UINT8, (2, 2)), _tensor("b", TensorProto.INT8, (2, 2)), _tensor("x", FLOAT, (2, 2))],
                   [_tensor("c", TensorProto.INT32, None), _tensor("y", FLOAT, None)], domains=["com.microsoft"])
    lines = [f.line() for f in lint_graph(model)]
    assert any(line.startswith("mmi (MatMulInteger): [op-unsupported]") for line in lines)
    assert any("com.microsoft.FusedMatMul is not in TensorRT's operator matrix" in line for line in lines)


def test_ops_and_opsets_are_judged_per_release() -> None:
    stft = _model([helper.make_node("STFT", ["x", "step"], ["y"], name="stft")], [_tensor("x", FLOAT, (1, 64, 1))],
                  [_tensor("y", FLOAT, None)], initializers=[numpy_helper.from_array(np.array(16, np.int64), "step")])
    assert _rules(lint_graph(stft)) == {"op-unsupported": ("10.3",)}  # added in 10.5 (changelog)
    too_new = _model([helper.make_node("Relu", ["x"], ["y"])], [_tensor("x", FLOAT, (1,))], [_tensor("y", FLOAT, None)], opset=21)
    assert _rules(lint_graph(too_new)) == {"opset": ("10.3",)}  # 10.0's header: opsets 9 to 20
    assert lint_graph(too_new, releases=["10.15"]) == []
    with pytest.raises(ValueError, match="no TensorRT parser rules for release '9.0'"):
        lint_graph(too_new, releases=["9.0"])


def test_input_types_follow_the_matrix() -> None:
    assert _rules(lint_graph(_model([helper.make_node("MatMul", ["x", "x"], ["y"], name="mm")], [_tensor("x", TensorProto.INT32, (2, 2))],
                                    [_tensor("y", TensorProto.INT32, None)]))) == {"input-type": ("10.3", "10.15")}
    # Integer Pow bases: only from 10.12 (changelog).
    pow_int = _model([helper.make_node("Pow", ["x", "x"], ["y"], name="pow")], [_tensor("x", INT64, (2,))], [_tensor("y", INT64, None)])
    assert _rules(lint_graph(pow_int)) == {"input-type": ("10.3",)}
    assert lint_graph(_unary("ArgMax", INT64, axis=1)) == []  # token ids: native INT64 ArgMax


def test_quantize_linear_needs_zero_zero_points_and_int8() -> None:
    def qdq(zero: np.ndarray, axis: int) -> onnx.ModelProto:
        scale = numpy_helper.from_array(np.full(zero.shape, 0.1, np.float32), "scale")
        nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q", axis=axis),
                 helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq", axis=axis)]
        return _model(nodes, [_tensor("x", FLOAT, ("batch", 4))], [_tensor("y", FLOAT, None)],
                      initializers=[scale, numpy_helper.from_array(zero, "zp")])

    per_channel = qdq(np.zeros(4, np.int8), axis=1)
    assert lint_graph(per_channel) == []
    asymmetric = lint_graph(qdq(np.array(128, np.uint8), axis=1))
    assert {(f.node, f.rule) for f in asymmetric} == {("q", "zero-point"), ("dq", "zero-point"), ("dq", "input-type")}
    assert "holds 128" in next(f.message for f in asymmetric if f.node == "q")


def test_axes_must_be_constants() -> None:
    reduce_dynamic = _model([helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")],
                            [_tensor("x", FLOAT, (2, 3)), _tensor("axes", INT64, (1,))], [_tensor("y", FLOAT, None)], opset=18)
    assert _rules(lint_graph(reduce_dynamic)) == {"reduce-axes": ("10.3", "10.15")}
    unsqueeze = _model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="u")],
                       [_tensor("x", FLOAT, (2,)), _tensor("axes", INT64, (1,))],
                       [_tensor("y", FLOAT, None)])
    assert _rules(lint_graph(unsqueeze)) == {"squeeze-axes": ("10.3",)}  # dynamic axes from 10.7 (changelog)


def test_resize_modes_and_layer_norm_outputs() -> None:
    sizes = numpy_helper.from_array(np.array([1, 3, 8, 8], np.int64), "sizes")
    def resize(mode: str) -> onnx.ModelProto:
        node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="rs", mode=mode)
        return _model([node], [_tensor("x", FLOAT, (1, 3, 4, 4))], [_tensor("y", FLOAT, None)], initializers=[sizes])

    assert [f.message for f in lint_graph(resize("cubic"))] == ["mode='cubic' (supported resize modes)"]
    assert lint_graph(resize("linear")) == []
    norm = _model([helper.make_node("LayerNormalization", ["x", "s"], ["y", "mean"], name="ln")], [_tensor("x", FLOAT, (2, 4))],
                  [_tensor("y", FLOAT, None), _tensor("mean", FLOAT, None)],
                  initializers=[numpy_helper.from_array(np.ones(4, np.float32), "s")])
    assert _rules(lint_graph(norm)) == {"first-output-only": ("10.3", "10.15")}


@pytest.mark.parametrize(("equation", "flagged"), [("bij,bjk->bik", False), ("...ij,...jk->...ik", True), ("ii->i", True)])
def test_einsum_equations_before_10_12(equation: str, flagged: bool) -> None:
    model = _model([helper.make_node("Einsum", ["a", "b"] if "," in equation else ["a"], ["y"], name="e", equation=equation)],
                   [_tensor("a", FLOAT, (2, 3, 3)), _tensor("b", FLOAT, (2, 3, 3))], [_tensor("y", FLOAT, None)])
    assert _rules(lint_graph(model)) == ({"einsum-equation": ("10.3",)} if flagged else {})


def _loop(*, scan: bool, trip_constant: bool, grow: bool) -> onnx.ModelProto:
    """A Loop carrying ``state`` (1, 4); with ``scan`` it also emits a scan output per iteration,
    with ``grow`` its body concatenates, so the carried shape changes."""
    body_nodes = [helper.make_node("Identity", ["cond"], ["cond_out"])]
    if grow:
        body_nodes.append(helper.make_node("Concat", ["state", "state"], ["next"], axis=0))
    else:
        body_nodes.append(helper.make_node("Add", ["state", "state"], ["next"]))
    outputs = [_tensor("cond_out", TensorProto.BOOL, ()), _tensor("next", FLOAT, (2, 4) if grow else (1, 4))]
    if scan:
        body_nodes.append(helper.make_node("Identity", ["state"], ["scanned"]))
        outputs.append(_tensor("scanned", FLOAT, (1, 4)))
    body = helper.make_graph(body_nodes, "body", [_tensor("i", INT64, ()), _tensor("cond", TensorProto.BOOL, ()),
                                                   _tensor("state", FLOAT, (1, 4))], outputs)
    trip = [numpy_helper.from_array(np.array(3, np.int64), "trip")] if trip_constant else []
    inputs = [_tensor("x", FLOAT, (1, 4)), _tensor("go", TensorProto.BOOL, ())] + ([] if trip_constant else [_tensor("trip", INT64, ())])
    loop = helper.make_node("Loop", ["trip", "go", "x"], ["final", *(["all"] if scan else [])], name="fusion", body=body)
    return _model([loop], inputs, [_tensor("final", FLOAT, None)], initializers=trip)


def test_loops_need_static_scan_lengths_and_steady_carried_shapes() -> None:
    assert lint_graph(_loop(scan=False, trip_constant=False, grow=False)) == []  # NEUCORE's form: no scan output
    assert lint_graph(_loop(scan=True, trip_constant=True, grow=False)) == []
    assert _rules(lint_graph(_loop(scan=True, trip_constant=False, grow=False))) == {"loop-scan-length": ("10.3", "10.15")}
    assert _rules(lint_graph(_loop(scan=False, trip_constant=True, grow=True))) == {"loop-carried-shape": ("10.3", "10.15")}


def test_dynamic_axes_must_be_ones_the_profile_sizes() -> None:
    model = _unary("Relu", shape=("batch", 3, "height", 8))
    assert [f.node for f in lint_graph(model)] == ["input:x"]
    fixed = _unary("Relu", shape=("batch", 3))
    assert lint_graph(fixed, profile={"x": ShapeRange(min=(1, 3), opt=(8, 3), max=(64, 3))}) == []
    wrong = lint_graph(fixed, profile={"x": ShapeRange(min=(1, 4), opt=(8, 4), max=(64, 4))})
    assert _rules(wrong) == {"dynamic-shape": ("10.3", "10.15")} and "fixed at 3" in wrong[0].message
    assert "no entry" in lint_graph(fixed, profile={})[0].message


def test_a_tensor_of_a_type_tensorrt_lacks_is_flagged() -> None:
    findings = lint_graph(_unary("Identity", TensorProto.UINT16))
    assert {(f.node, f.rule) for f in findings} == {("tensor:x", "tensor-type"), ("tensor:y", "tensor-type"), ("n", "input-type")}


def test_the_rules_file_cites_a_source_for_every_rule(tmp_path: Path) -> None:
    rules = load_rules()
    assert set(rules.releases) == {"10.3", "10.15"} and rules.read_on == "2026-12-06"
    assert all(release["source"] in rules.sources for release in rules.releases.values())
    assert all(rule.source in rules.sources for rule in rules.restrictions)
    assert rules.operators["Loop"].supported and not rules.operators["DynamicQuantizeLinear"].supported
    broken = tmp_path / "rules.json"
    broken.write_text(json.dumps({"format": "something-else", "schema": 1}))
    from compir.errors import ContractError

    with pytest.raises(ContractError, match="is not a compir-trt-parser-rules schema 1 file"):
        load_rules(broken)


def test_every_variant_of_the_fixture_export(tiny_export_all: Path) -> None:
    """fp32, fp16 and int8-static (split graphs and the fused query encoder) parse on both releases;
    int8-dynamic and int8-static-u8 are onnxruntime variants and are flagged for exactly why."""
    from compir.export.trt.lint_export import TENSORRT_VARIANTS, blocking, lint_export, summary_lines

    result = lint_export(tiny_export_all)
    assert set(result) == {"fp32", "fp16", "int8-dynamic", "int8-static", "int8-static-u8"}
    assert blocking(result) == [] and set(result["fp32"]) >= {"image_encoder", "text_encoder", "composer", "query_encoder"}
    dynamic = {(f.op, f.rule) for findings in result["int8-dynamic"].values() for f in findings}
    assert dynamic == {("DynamicQuantizeLinear", "op-unsupported"), ("MatMulInteger", "op-unsupported")}
    u8 = {(f.op, f.rule) for findings in result["int8-static-u8"].values() for f in findings}
    assert ("QuantizeLinear", "zero-point") in u8 and ("DequantizeLinear", "input-type") in u8
    lines = summary_lines(result)
    assert lines[-1].startswith(f"TensorRT lint: {', '.join(TENSORRT_VARIANTS)} parse on TensorRT 10.3, 10.15")


def test_integer_cumsum_and_boolean_nonzero_get_float_bodies_with_the_same_results() -> None:
    """HF RoBERTa-style position ids: cumsum of the int32 padding mask, which TensorRT's CumSum refuses."""
    import onnxruntime as ort

    from compir.export.trt.forms import float_bodies

    axis = numpy_helper.from_array(np.array(1, np.int64), "axis")
    nodes = [helper.make_node("Cast", ["mask"], ["mask32"], to=TensorProto.INT32),
             helper.make_node("CumSum", ["mask32", "axis"], ["positions"], name="cumsum")]
    model = _model(nodes, [_tensor("mask", INT64, ("batch", "sequence"))], [_tensor("positions", TensorProto.INT32, None)],
                   initializers=[axis])
    assert _rules(lint_graph(model)) == {"input-type": ("10.3", "10.15")}
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"mask": mask})[0]
    assert float_bodies(model) == 1 and lint_graph(model) == []
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"mask": mask})[0]
    assert after.dtype == before.dtype == np.int32 and np.array_equal(after, before)
    assert float_bodies(model) == 0  # already float inside
    flags = _model([helper.make_node("NonZero", ["flag"], ["where"], name="nz")], [_tensor("flag", TensorProto.BOOL, ("batch", 4))],
                   [_tensor("where", INT64, None)])
    assert _rules(lint_graph(flags)) == {"input-type": ("10.3", "10.15")}  # BERT's traced mask checks
    feed = {"flag": np.array([[True, False, True, False]])}
    before = ort.InferenceSession(flags.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert float_bodies(flags) == 1 and lint_graph(flags) == []
    assert np.array_equal(ort.InferenceSession(flags.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0], before)
