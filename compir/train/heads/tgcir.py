"""TG-CIR (Wen et al. 2023): target-guided composition over global and local attribute tokens.

Features are sets of K = ``global_tokens + local_tokens`` L2-normalised attribute tokens (B, K, D):

- global: ``global_tokens`` masked copies of the pooled embedding (one non-negative channel mask per
  copy), so each copy keeps a different subset of channels;
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
(remain + replace -> 1), ``distill`` (student keep <- teacher remain and 1 - keep <- teacher replace,
the sum of two MSEs, teacher detached), ``ortho`` (token Gram matrix -> identity) and ``matching``
(KL from the soft labels to the student query's similarity distribution over the batch targets, at
``matching_temperature``).

As the authors' code computes it (iLearn-Lab/MM23-TG-CIR ``model.py``; each is a head option, the
default being theirs; compir's earlier form is kept as the other value):

- ``matching_labels="target"``: the soft labels are the true target's similarity to every batch
  target (target-to-target), softened at the temperature and detached ("teacher": the teacher
  query's similarities, compir's earlier reading);
- ``detach_teacher_inputs``: the reference and text tokens reach the teacher detached, so the
  teacher loss trains the teacher gates and the target's features only;
- ``shared_extractors``: one token learner and one set of global masks for image and text (a
  per-modality linear map brings the tokens to D first); the masks are ReLU'd, block-initialised
  (1 on their own D/P channels, 0.1 elsewhere) and applied to the pooled embedding as is (False:
  separate modules per modality, sigmoid masks from a random start and a projection);
- ``image_tokens="pre_ln_cls"``: the token learner reads the vision transformer's tokens before its
  final LayerNorm, class token included (``CIRModel`` asks :attr:`wants_raw_image_tokens`;
  "post_ln": open_clip's normalised patch tokens);
- ``teacher_local_weight``: a learned weight per token slot scales the teacher's and the target's
  (unit) tokens, which are flattened into one vector each for the teacher InfoNCE and the matching
  soft labels (False: mean-pooled vectors).

Where compir differs from the authors on purpose: the token learner is softmax attention over the
positions (theirs: a sigmoid gate per position, averaged), padding words are masked out (theirs pool
them), every token is L2-normalised before composition, the flattened teacher vectors are
normalised before the InfoNCE (theirs: raw, with their own learned temperature), and the InfoNCE
temperature is the backbone's learned ``logit_scale``.

Ablation on the synthetic benchmark (README, methods; ``tiny-tgcir``, one seed, 100 steps of batch 32
of a 400-step schedule, fp32, AMD EPYC AVX-512 under heavy load): compir's earlier form (all five
options the other way) val / test R@1 33.6 / 29.80, the authors' form 31.0 / 30.10, the authors' form
with teacher soft labels 30.2 / 28.80, the authors' form without detached teacher inputs 26.2 / 27.20,
with separate extractors 27.0 / 25.20, with LayerNorm'd patch tokens 27.4 / 29.40.
Within one seed's noise, nothing shows compir's variants better, so the authors' form is the default.
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
MATCHING_LABELS = ("target", "teacher")
IMAGE_TOKENS = ("pre_ln_cls", "post_ln")


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


class BlockMasks(nn.Module):
    """The authors' global masks: ``count`` non-negative (ReLU) channel masks of the pooled embedding,
    mask i starting at 1 on its own block of E / count channels and 0.1 elsewhere: (B, E) -> (B, count, E)."""

    def __init__(self, *, embed_dim: int, count: int) -> None:
        super().__init__()
        start = torch.full((count, embed_dim), 0.1)
        block = embed_dim // count
        for index in range(count):
            start[index, index * block : (index + 1) * block] = 1.0
        self.masks = nn.Parameter(start)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled.unsqueeze(1) * F.relu(self.masks)


def _gate(dim: int, hidden_dim: int) -> nn.Sequential:
    """MLP([a, b]) -> one logit per token: (B, K, 2D) -> (B, K, 1)."""
    return nn.Sequential(nn.Linear(2 * dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))


@register_head("tgcir")
class TgcirHead(CompositionHead):
    """See the module docstring. Options: ``global_tokens``, ``local_tokens``, ``hidden_dim``,
    ``matching_temperature``, ``matching_labels``, ``detach_teacher_inputs``, ``shared_extractors``,
    ``image_tokens``, ``teacher_local_weight``."""

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
        matching_labels: str = "target",
        detach_teacher_inputs: bool = True,
        shared_extractors: bool = True,
        image_tokens: str = "pre_ln_cls",
        teacher_local_weight: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, image_width=image_width, text_width=text_width)
        if options:
            raise TypeError(f"tgcir head: unknown option(s) {sorted(options)}")
        if global_tokens < 0 or local_tokens < 0 or global_tokens + local_tokens < 1:
            raise TypeError("tgcir head: global_tokens + local_tokens must be >= 1 (both >= 0)")
        if matching_labels not in MATCHING_LABELS:
            raise TypeError(f"tgcir head: matching_labels must be one of {MATCHING_LABELS}, got {matching_labels!r}")
        if image_tokens not in IMAGE_TOKENS:
            raise TypeError(f"tgcir head: image_tokens must be one of {IMAGE_TOKENS}, got {image_tokens!r}")
        self.tokens = global_tokens + local_tokens
        self.matching_temperature = float(matching_temperature)
        self.matching_labels = matching_labels
        self.detach_teacher_inputs = bool(detach_teacher_inputs)
        self.wants_raw_image_tokens = image_tokens == "pre_ln_cls"
        dim = embed_dim
        self.image_global: nn.Module | None = None
        self.text_global: nn.Module | None = None
        self.shared_global: BlockMasks | None = None
        self.image_local: nn.Module | None = None
        self.text_local: nn.Module | None = None
        self.shared_local: TokenLearner | None = None
        if shared_extractors:
            self.shared_global = BlockMasks(embed_dim=embed_dim, count=global_tokens) if global_tokens else None
            if local_tokens:
                self.image_local = nn.Linear(image_width, dim)  # to the shared learner's width
                self.text_local = nn.Linear(text_width, dim)
                self.shared_local = TokenLearner(width=dim, out_dim=dim, count=local_tokens, hidden_dim=hidden_dim)
        else:
            if global_tokens:
                self.image_global = GlobalMasks(embed_dim=embed_dim, out_dim=dim, count=global_tokens)
                self.text_global = GlobalMasks(embed_dim=embed_dim, out_dim=dim, count=global_tokens)
            if local_tokens:
                self.image_local = TokenLearner(width=image_width, out_dim=dim, count=local_tokens, hidden_dim=hidden_dim)
                self.text_local = TokenLearner(width=text_width, out_dim=dim, count=local_tokens, hidden_dim=hidden_dim)
        self.local_weight = nn.Parameter(torch.ones(self.tokens)) if teacher_local_weight else None
        self.student_gate = _gate(dim, hidden_dim)
        self.teacher_remain = _gate(dim, hidden_dim)
        self.teacher_replace = _gate(dim, hidden_dim)

    # ---- features ---------------------------------------------------------------------------
    def _features(
        self, pooled: torch.Tensor, tokens: torch.Tensor, own_global: nn.Module | None, own_local: nn.Module | None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = []
        global_masks = self.shared_global if self.shared_global is not None else own_global
        if global_masks is not None:
            parts.append(global_masks(pooled))
        if own_local is not None:
            if self.shared_local is not None:
                parts.append(self.shared_local(own_local(tokens), bias))
            else:
                parts.append(own_local(tokens, bias))
        return F.normalize(torch.cat(parts, dim=1), dim=-1)

    def image_features(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """pooled (B, E), image tokens (B, T, Wi) -> attribute tokens (B, K, D), each unit length."""
        return self._features(pooled, tokens, self.image_global, self.image_local)

    def text_features(self, pooled: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """pooled (B, E), words (B, L, Wt), padding (B, L) bool -> attribute tokens (B, K, D); padding is ignored."""
        bias = padding.to(tokens.dtype) * _MASKED
        return self._features(pooled, tokens, self.text_global, self.text_local, bias)

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

    def _teacher_vector(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, K*D) unit vectors of the slot-weighted unit tokens, or (B, D) normalised means."""
        if self.local_weight is None:
            return F.normalize(tokens.mean(dim=1), dim=-1)
        weighted = F.normalize(tokens, dim=-1) * self.local_weight.view(1, -1, 1)
        return F.normalize(weighted.flatten(1), dim=-1)

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
        t_reference, t_text = (reference.detach(), text.detach()) if self.detach_teacher_inputs else (reference, text)
        remain, replace = self.teacher_masks(t_reference, t_text, target)
        teacher = self._teacher_vector(remain * t_reference + replace * t_text)
        teacher_target = self._teacher_vector(target)
        # The teacher guides; it is not pulled toward the student (hence the detaches).
        distill = F.mse_loss(keep, remain.detach()) + F.mse_loss(1.0 - keep, replace.detach())
        tau = self.matching_temperature
        student_log = F.log_softmax((student @ gallery.T).float() / tau, dim=-1)
        labels = teacher_target if self.matching_labels == "target" else teacher
        soft = F.softmax((labels @ teacher_target.T).detach().float() / tau, dim=-1)
        return {
            "composed": batch_classification_loss(student, gallery, logit_scale),
            "teacher": batch_classification_loss(teacher, teacher_target, logit_scale),
            "mask_constraint": ((remain + replace - 1.0) ** 2).mean(),
            "distill": distill,
            "ortho": orthogonality_loss(torch.cat([reference, text, target])),
            "matching": F.kl_div(student_log, soft, reduction="batchmean"),
        }


def orthogonality_loss(tokens: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each sample's token cosine Gram matrix (K, K) from the identity."""
    unit = F.normalize(tokens, dim=-1)
    gram = unit @ unit.transpose(1, 2)  # (B, K, K)
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return ((gram - eye) ** 2).mean()
