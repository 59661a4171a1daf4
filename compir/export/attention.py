"""Export-friendly self-attention: the same math as ``nn.MultiheadAttention``, fewer ONNX nodes.

TorchScript export of ``nn.MultiheadAttention`` computes every reshape target from the input's
runtime shape (Shape -> Gather -> Unsqueeze -> Concat -> Reshape, a few dozen nodes per layer).
On a small model at batch 1 those bookkeeping nodes cost as much as the matrix products. Here
the sequence length and the head layout are baked in at trace time (they are fixed: the context
length and the patch count), and only the batch axis stays dynamic (``-1``), so each layer
exports as one fused QKV MatMul, a few Reshape/Transpose nodes with constant shapes, two
MatMuls, Softmax and the output projection.

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


class ExportAttention(nn.Module):
    """Batch-first multi-head attention over an ``nn.MultiheadAttention``'s parameters."""

    def __init__(self, source: nn.MultiheadAttention) -> None:
        super().__init__()
        self.source = source
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
        # Python ints while tracing: fixed sizes become constants in the graph (batch stays -1).
        q_len, k_len = int(query.shape[1]), int(key.shape[1])
        heads, dim = self.heads, self.head_dim
        if key is query and value is query:
            qkv = F.linear(query, src.in_proj_weight, src.in_proj_bias)  # (B, L, 3E)
            qkv = qkv.reshape(-1, q_len, 3, heads, dim).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            w_q, w_k, w_v = src.in_proj_weight.chunk(3)
            b_q, b_k, b_v = src.in_proj_bias.chunk(3) if src.in_proj_bias is not None else (None, None, None)
            q = F.linear(query, w_q, b_q).reshape(-1, q_len, heads, dim).transpose(1, 2)
            k = F.linear(key, w_k, b_k).reshape(-1, k_len, heads, dim).transpose(1, 2)
            v = F.linear(value, w_v, b_v).reshape(-1, k_len, heads, dim).transpose(1, 2)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, Lq, Lk)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
            scores = scores + attn_mask  # (Lq, Lk) broadcast over batch and heads
        out = scores.softmax(dim=-1) @ v  # (B, H, Lq, d)
        out = out.transpose(1, 2).reshape(-1, q_len, self.embed_dim)
        return src.out_proj(out), None


def export_ready(model: nn.Module) -> nn.Module:
    """``model`` with each batch-first, same-width ``nn.MultiheadAttention`` swapped for
    :class:`ExportAttention`. Modules on the path to a swap are shallow copies, everything else
    (parameters included) is shared; ``model`` itself is unchanged."""
    if isinstance(model, nn.MultiheadAttention) and model.batch_first and model._qkv_same_embed_dim:
        return ExportAttention(model)
    children = {name: export_ready(child) for name, child in model.named_children()}
    if all(children[name] is child for name, child in model.named_children()):
        return model
    clone = copy.copy(model)
    clone._modules = {**model._modules, **children}
    return clone
