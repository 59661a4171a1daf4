"""The export-friendly attention swap: same outputs as nn.MultiheadAttention, model untouched,
and an exported graph free of runtime shape bookkeeping."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from compir.export.attention import ExportAttention, export_ready


@pytest.fixture()
def mha() -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(32, 4, batch_first=True).eval()


@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_self_attention_matches_multihead_attention(mha: nn.MultiheadAttention, mask: str | None) -> None:
    x = torch.randn(3, 7, 32)
    attn_mask = None
    if mask is not None:
        causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
        attn_mask = causal if mask == "bool" else torch.zeros(7, 7).masked_fill(causal, float("-inf"))
    expected = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
    got = ExportAttention(mha)(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_cross_attention_matches_multihead_attention(mha: nn.MultiheadAttention) -> None:
    query, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    expected = mha(query, memory, memory, need_weights=False)[0]
    got = ExportAttention(mha)(query, memory, memory, need_weights=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_export_ready_swaps_a_copy_and_shares_weights(mha: nn.MultiheadAttention) -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.Sequential(mha))
    ready = export_ready(model)
    assert isinstance(model[1][0], nn.MultiheadAttention)  # the original is unchanged
    swapped = ready[1][0]
    assert isinstance(swapped, ExportAttention) and swapped.source is mha
    assert ready[0] is model[0]


def test_exported_encoders_have_no_per_layer_shape_arithmetic(tiny_export: Path) -> None:
    # Each nn.MultiheadAttention exported as-is adds ~6 Shape nodes per layer; the swap leaves
    # only the few the batch-dependent class token and pooling need, plus one per layer where the
    # text's length is free (the causal mask cut to it).
    for role, per_layer in (("image_encoder", 0), ("text_encoder", 1)):
        graph = onnx.load(str(tiny_export / "fp32" / f"{role}.onnx")).graph
        shapes = sum(node.op_type == "Shape" for node in graph.node)
        attention_blocks = sum(node.op_type == "Softmax" for node in graph.node)
        assert attention_blocks >= 2, role
        assert shapes <= 6 + per_layer * attention_blocks, f"{role}: {shapes} Shape nodes for {attention_blocks} attention blocks"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dynamic_length", [False, True])
def test_head_split_is_one_constant_reshape_at_any_length(mha: nn.MultiheadAttention, tmp_path: Path, dynamic_length: bool) -> None:
    import numpy as np
    import onnxruntime

    causal = torch.zeros(9, 9).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False, attn_mask=causal)[0]

    path = tmp_path / "block.onnx"
    axes = {0: "batch", 1: "sequence"} if dynamic_length else {0: "batch"}
    torch.onnx.export(export_ready(Block(), dynamic_length=dynamic_length), (torch.randn(2, 9, 32),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": axes, "y": axes}, opset_version=17, dynamo=False)
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "Shape" for node in graph.node) == int(dynamic_length)  # the mask's cut only
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length in (9, 4) if dynamic_length else (9,):
        x = torch.randn(3, length, 32)
        expected = mha(x, x, x, need_weights=False, attn_mask=causal[:length, :length])[0].detach().numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, atol=1e-5)
