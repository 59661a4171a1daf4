"""Export-friendly self-attention: the same math as ``nn.MultiheadAttention``, fewer ONNX nodes.

TorchScript export of ``nn.MultiheadAttention`` computes every reshape target from the input's
runtime shape (Shape -> Gather -> Unsqueeze -> Concat -> Reshape, a few dozen nodes per layer).
On a small model at batch 1 those bookkeeping nodes cost as much as the matrix products. Here
each head split / merge exports as one Reshape with a constant target ``[-1, 0, ...]`` whose ``0``
copies the input's sequence axis (ONNX's Reshape semantics: :class:`_Reshape`), so each layer is one
fused QKV MatMul, Reshape/Transpose nodes with constant shapes, two MatMuls, Softmax and the
output projection, whatever the batch and the sequence length.

The sequence length is free (``dynamic_length=True``, the text graphs that are cut to their
longest text: :mod:`compir.export.graphs`) or fixed at trace time (the patch count, a fixed
context): only the additive mask (a causal ``(L, L)`` buffer of the full context) is sliced to
the input's length when it is free, one Shape and one Slice node per layer (:class:`_CutMask`).

:func:`export_ready` returns a copy of a model with each batch-first ``nn.MultiheadAttention``
swapped for :class:`ExportAttention` (the weights are shared, not copied); the export's parity
check then proves the swap changes nothing.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _Reshape(torch.autograd.Function):
    """``x (*lead, ...) -> (*lead, *tail)`` keeping the first ``keep`` axes of ``x``: in ONNX one
    Reshape with the constant target ``[-1, 0, ..., *tail]`` (``0`` copies the input's axis, ``-1``
    the batch follows from the rest)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: int, tail: tuple[int, ...]) -> torch.Tensor:
        return x.reshape(*x.shape[:keep], *tail)

    @staticmethod
    def symbolic(g: Any, x: Any, keep: int, tail: tuple[int, ...]) -> Any:
        target = g.op("Constant", value_t=torch.tensor([-1] + [0] * (keep - 1) + list(tail), dtype=torch.int64))
        return g.op("Reshape", x, target)


def _reshape(x: torch.Tensor, keep: int, *tail: int) -> torch.Tensor:
    return _Reshape.apply(x, keep, tail)


class _CutMask(torch.autograd.Function):
    """``mask (.., L, L)`` cut to the last two axes of ``scores (B, H, Lq, Lk)``: in ONNX one Shape
    (from axis 2) and one Slice."""

    @staticmethod
    def forward(ctx: Any, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return mask[..., : scores.shape[-2], : scores.shape[-1]]

    @staticmethod
    def symbolic(g: Any, mask: Any, scores: Any) -> Any:
        ends = g.op("Shape", scores, start_i=2)  # [Lq, Lk]
        starts = g.op("Constant", value_t=torch.tensor([0, 0], dtype=torch.int64))
        axes = g.op("Constant", value_t=torch.tensor([-2, -1], dtype=torch.int64))
        return g.op("Slice", mask, starts, ends, axes)


class ExportAttention(nn.Module):
    """Batch-first multi-head attention over an ``nn.MultiheadAttention``'s parameters;
    ``dynamic_length``: the sequence length comes from the input (else fixed at trace time)."""

    def __init__(self, source: nn.MultiheadAttention, *, dynamic_length: bool = False) -> None:
        super().__init__()
        self.source = source
        self.dynamic_length = dynamic_length
        self.heads = source.num_heads
        self.head_dim = source.head_dim
        self.embed_dim = source.embed_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if key_padding_mask is not None or kwargs.get("is_causal"):
            # Not a path compir's models take; the original module handles it exactly.
            return self.source(query, key, value, key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask, **kwargs)
        src = self.source
        heads, dim = self.heads, self.head_dim
        if key is query and value is query:
            qkv = F.linear(query, src.in_proj_weight, src.in_proj_bias)  # (B, L, 3E)
            qkv = _reshape(qkv, 2, 3, heads, dim).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            w_q, w_k, w_v = src.in_proj_weight.chunk(3)
            b_q, b_k, b_v = src.in_proj_bias.chunk(3) if src.in_proj_bias is not None else (None, None, None)
            q = _reshape(F.linear(query, w_q, b_q), 2, heads, dim).transpose(1, 2)  # (B, H, Lq, d)
            k = _reshape(F.linear(key, w_k, b_k), 2, heads, dim).transpose(1, 2)  # (B, H, Lk, d)
            v = _reshape(F.linear(value, w_v, b_v), 2, heads, dim).transpose(1, 2)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, Lq, Lk)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
            if self.dynamic_length:  # a full-context mask (open_clip's causal buffer) cut to this input's length
                attn_mask = _CutMask.apply(attn_mask, scores)
            scores = scores + attn_mask  # (Lq, Lk) broadcast over batch and heads
        out = scores.softmax(dim=-1) @ v  # (B, H, Lq, d)
        out = _reshape(out.transpose(1, 2), 2, self.embed_dim)  # (B, Lq, E)
        return src.out_proj(out), None


def export_ready(model: nn.Module, *, dynamic_length: bool = False) -> nn.Module:
    """``model`` with each batch-first, same-width ``nn.MultiheadAttention`` swapped for
    :class:`ExportAttention` (``dynamic_length`` passed on). Modules on the path to a swap are
    shallow copies, everything else (parameters included) is shared; ``model`` itself is unchanged."""
    if isinstance(model, nn.MultiheadAttention) and model.batch_first and model._qkv_same_embed_dim:
        return ExportAttention(model, dynamic_length=dynamic_length)
    children = {name: export_ready(child, dynamic_length=dynamic_length) for name, child in model.named_children()}
    if all(children[name] is child for name, child in model.named_children()):
        return model
    clone = copy.copy(model)
    clone._modules = {**model._modules, **children}
    return clone
