"""AdamW with CLIP's weight-decay split, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over trainable parameters; gains, biases, embeddings and the temperature are not decayed.

    ``backbone_lr_scale`` (< 1 when fine-tuning pretrained towers) scales the backbone's rate.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(".bias")
        in_backbone = ".backbone." in f".{name}"
        groups.setdefault((no_decay, in_backbone), []).append(param)
    param_groups = [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "base_lr": lr * (backbone_lr_scale if in_backbone else 1.0),
            "lr": lr * (backbone_lr_scale if in_backbone else 1.0),
        }
        for (no_decay, in_backbone), params in sorted(groups.items())
    ]
    # The fused kernel is ~6x faster on the CPU too (the 6M-row token embedding dominates).
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def lr_factor(*, step: int, progress: float, warmup_steps: int, min_factor: float = 0.02) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay in ``progress`` (0 -> 1).

    ``progress`` is the share of the run done: steps over total steps, or time over the
    ``--minutes`` budget, whichever is further along.
    """
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return warm * (min_factor + (1.0 - min_factor) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's base rate; returns the first group's rate (for the progress bar)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return float(optimizer.param_groups[0]["lr"])
