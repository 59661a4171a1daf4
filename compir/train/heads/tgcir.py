"""TG-CIR (Wen et al. 2023): target-guided composition over global and local attribute tokens.

Features are sets of K = ``global_tokens + local_tokens`` L2-normalised attribute tokens (B, K, D):

- global: ``global_tokens`` masked copies of the pooled embedding (a learned soft mask over E per
  copy, then a shared projection), so each copy can keep a different subset of channels;
- local: a token learner (spatial attention pooling of the patch / word tokens into
  ``local_tokens`` tokens; padding words are masked out).

Composition works slot by slot (token k of r with token k of m):

- student (target-free, the only path at inference): ``keep = sigmoid(MLP([r, m]))`` and
  ``fused = keep * r + (1 - keep) * m``; the query is ``normalize(mean_k fused)``;
- teacher (sees t, training only): ``remain = sigmoid(MLP([r, t]))``, ``replace = sigmoid(MLP([m, t]))``,
  ``fused = remain * r + replace * m``.

Gallery and text vectors are ``normalize(mean_k tokens)``, so the model exports and indexes
like the combiner. Loss terms (weights in the model config, e.g. ``tiny-tgcir.json``):
``composed`` (student InfoNCE), ``teacher`` (teacher InfoNCE), ``mask_constraint``
(remain + replace -> 1), ``distill`` (student keep <- teacher masks, MSE; the teacher is
detached so only the student gate learns from it), ``ortho`` (token Gram matrix -> identity) and
``matching`` (KL from the teacher's batch similarity distribution to the student's at
``matching_temperature``, teacher detached).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compir.train.heads import register_head
from compir.train.heads.base import CompositionHead
from compir.train.losses import batch_classification_loss

_MASKED = -1e4  # additive attention bias of padding words (finite: exports and runs in fp16)


class TokenLearner(nn.Module):
    """Spatial attention pooling: (B, T, W) tokens -> (B, K, D), one attention map per output token."""

    def __init__(self, *, width: int, out_dim: int, count: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.Sequential(nn.Linear(width, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, count))
        self.projection = nn.Linear(width, out_dim)

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.norm(tokens)  # (B, T, W)
        logits = self.attention(normed)  # (B, T, K)
        if bias is not None:
            logits = logits + bias.unsqueeze(-1)  # bias (B, T): 0 or _MASKED
        weights = logits.softmax(dim=1)  # attention over the T positions, per output token
        pooled = weights.transpose(1, 2) @ normed  # (B, K, W)
        return self.projection(pooled)  # (B, K, D)


class GlobalMasks(nn.Module):
    """``count`` learned soft channel masks of the pooled embedding: (B, E) -> (B, count, D)."""

    def __init__(self, *, embed_dim: int, out_dim: int, count: int) -> None:
        super().__init__()
        # Different random starts, so the copies do not begin identical.
        self.mask_logits = nn.Parameter(torch.randn(count, embed_dim))
        self.projection = nn.Linear(embed_dim, out_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        masked = pooled.unsqueeze(1) * torch.sigmoid(self.mask_logits)  # (B, count, E)
        return self.projection(masked)


def _gate(dim: int, hidden_dim: int) -> nn.Sequential:
    """MLP([a, b]) -> one logit per token: (B, K, 2D) -> (B, K, 1)."""
    return nn.Sequential(nn.Linear(2 * dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))


@register_head("tgcir")
class TgcirHead(CompositionHead):
    """See the module docstring. Options: ``global_tokens``, ``local_tokens``, ``hidden_dim``,
    ``matching_temperature``."""

    loss_terms = ("composed", "teacher", "mask_constraint", "distill", "ortho", "matching")
    # tiny-tgcir.json's weights (tuned on the synthetic benchmark), for `compir train --head tgcir`.
    default_loss_weights = {"composed": 1.0, "teacher": 0.5, "mask_constraint": 0.1, "distill": 1.0, "ortho": 0.1, "matching": 1.0}

    def __init__(
        self,
        *,
        embed_dim: int,
        image_width: int,
        text_width: int,
        global_tokens: int = 2,
        local_tokens: int = 4,
        hidden_dim: int = 256,
        matching_temperature: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, image_width=image_width, text_width=text_width)
        if options:
            raise TypeError(f"tgcir head: unknown option(s) {sorted(options)}")
        if global_tokens < 0 or local_tokens < 0 or global_tokens + local_tokens < 1:
            raise TypeError("tgcir head: global_tokens + local_tokens must be >= 1 (both >= 0)")
        self.tokens = global_tokens + local_tokens
        self.matching_temperature = float(matching_temperature)
        dim = embed_dim
        self.image_global = GlobalMasks(embed_dim=embed_dim, out_dim=dim, count=global_tokens) if global_tokens else None
        self.text_global = GlobalMasks(embed_dim=embed_dim, out_dim=dim, count=global_tokens) if global_tokens else None
        self.image_local = TokenLearner(width=image_width, out_dim=dim, count=local_tokens, hidden_dim=hidden_dim) if local_tokens else None
        self.text_local = TokenLearner(width=text_width, out_dim=dim, count=local_tokens, hidden_dim=hidden_dim) if local_tokens else None
        self.student_gate = _gate(dim, hidden_dim)
        self.teacher_remain = _gate(dim, hidden_dim)
        self.teacher_replace = _gate(dim, hidden_dim)

    # ---- features ---------------------------------------------------------------------------
    def image_features(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """pooled (B, E), patches (B, P, Wi) -> attribute tokens (B, K, D), each unit length."""
        parts = []
        if self.image_global is not None:
            parts.append(self.image_global(pooled))
        if self.image_local is not None:
            parts.append(self.image_local(tokens))
        return F.normalize(torch.cat(parts, dim=1), dim=-1)

    def text_features(self, pooled: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """pooled (B, E), words (B, L, Wt), padding (B, L) bool -> attribute tokens (B, K, D); padding is ignored."""
        parts = []
        if self.text_global is not None:
            parts.append(self.text_global(pooled))
        if self.text_local is not None:
            bias = padding.to(tokens.dtype) * _MASKED
            parts.append(self.text_local(tokens, bias))
        return F.normalize(torch.cat(parts, dim=1), dim=-1)

    def gallery_embeds(self, image_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_features.mean(dim=1), dim=-1)

    def text_embeds(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(text_features.mean(dim=1), dim=-1)

    # ---- composition ------------------------------------------------------------------------
    def student_keep(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, K, D) x 2 -> keep share of each reference token (B, K, 1)."""
        return torch.sigmoid(self.student_gate(torch.cat([reference, text], dim=-1)))

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        keep = self.student_keep(image_features, text_features)
        fused = keep * image_features + (1.0 - keep) * text_features  # (B, K, D)
        return F.normalize(fused.mean(dim=1), dim=-1)

    def teacher_masks(self, reference: torch.Tensor, text: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(remain, replace), each (B, K, 1): how much of r and of m the target keeps, per token."""
        remain = torch.sigmoid(self.teacher_remain(torch.cat([reference, target], dim=-1)))
        replace = torch.sigmoid(self.teacher_replace(torch.cat([text, target], dim=-1)))
        return remain, replace

    def training_losses(
        self,
        *,
        reference: torch.Tensor,
        text: torch.Tensor,
        target: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        gallery = self.gallery_embeds(target)  # (B, D)
        keep = self.student_keep(reference, text)
        student = F.normalize((keep * reference + (1.0 - keep) * text).mean(dim=1), dim=-1)
        remain, replace = self.teacher_masks(reference, text, target)
        teacher = F.normalize((remain * reference + replace * text).mean(dim=1), dim=-1)
        # The teacher guides; it is not pulled toward the student (hence the detaches).
        remain_d, replace_d = remain.detach(), replace.detach()
        distill = 0.5 * (F.mse_loss(keep, remain_d) + F.mse_loss(1.0 - keep, replace_d))
        tau = self.matching_temperature
        student_log = F.log_softmax((student @ gallery.T).float() / tau, dim=-1)
        teacher_prob = F.softmax((teacher.detach() @ gallery.detach().T).float() / tau, dim=-1)
        return {
            "composed": batch_classification_loss(student, gallery, logit_scale),
            "teacher": batch_classification_loss(teacher, gallery, logit_scale),
            "mask_constraint": ((remain + replace - 1.0) ** 2).mean(),
            "distill": distill,
            "ortho": orthogonality_loss(torch.cat([reference, text, target])),
            "matching": F.kl_div(student_log, teacher_prob, reduction="batchmean"),
        }


def orthogonality_loss(tokens: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each sample's token cosine Gram matrix (K, K) from the identity."""
    unit = F.normalize(tokens, dim=-1)
    gram = unit @ unit.transpose(1, 2)  # (B, K, K)
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return ((gram - eye) ** 2).mean()
