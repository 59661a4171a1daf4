"""The CLIP4Cir combiner (Baldrati et al.): a gated residual fusion of image and text vectors.

Two forms (head option ``form``):

- ``compir`` (default): inputs are the backbone's L2-normalised pooled embeddings, concatenated
  image then text, trained in one stage with the backbone's learned temperature.
- ``clip4cir``: as the authors' code computes it: CLIP's raw (unnormalised) ``encode_image`` /
  ``encode_text`` features, concatenated text then image, a fixed temperature of 100. Imported
  CLIP4Cir checkpoints (``compir import clip4cir``) use it, so retrained and imported ones agree.

Either form trains in one stage (option ``stage="joint"``) or in the authors' two stages:
``stage="clip"`` fine-tunes the towers with the query ``normalize(image + text)`` (the combiner is
not used and not trained), then ``stage="combiner"`` trains the combiner on frozen towers
(``compir train --init STAGE1.pt --head-option stage=combiner``).

The layers, by the authors' names (the importer maps their keys onto these):

    text_projection_layer, dropout1   text_projection  = Linear(E, P), ReLU, Dropout
    image_projection_layer, dropout2  image_projection = Linear(E, P), ReLU, Dropout
    combiner_layer, dropout3,         residual         = Linear(2P, H), ReLU, Dropout, Linear(H, E)
      output_layer
    dynamic_scalar                    gate             = Linear(2P, H), ReLU, Dropout, Linear(H, 1)  (sigmoid in compose)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compir.train.heads import register_head
from compir.train.heads.base import CompositionHead
from compir.train.losses import batch_classification_loss

FORMS = ("compir", "clip4cir")
STAGES = ("joint", "clip", "combiner")
# CLIP4Cir's fixed softmax temperature (``Combiner.logit_scale = 100``; the same in their CLIP fine-tuning).
CLIP4CIR_LOGIT_SCALE = 100.0


@register_head("combiner")
class CombinerHead(CompositionHead):
    """Features are the backbone's pooled embeddings (B, E), normalised or raw (``form``); tokens are unused.

    compose: project both (Linear, ReLU, Dropout), concatenate; a hidden layer gives a residual
    and a gate lambda = sigmoid(MLP(concat)) mixes lambda * text + (1 - lambda) * image.
    Options: ``projection_dim`` P, ``hidden_dim`` H, ``dropout``, ``form``, ``stage`` (module docstring).
    """

    loss_terms = ("composed",)
    clip_space = True  # both forms: gallery / text vectors are the normalised pooled embeddings

    def __init__(
        self,
        *,
        embed_dim: int,
        image_width: int,
        text_width: int,
        projection_dim: int = 512,
        hidden_dim: int = 1024,
        dropout: float = 0.1,
        form: str = "compir",
        stage: str = "joint",
        **options: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, image_width=image_width, text_width=text_width)
        if options:
            raise TypeError(f"combiner head: unknown option(s) {sorted(options)}")
        if form not in FORMS:
            raise TypeError(f"combiner head: form must be one of {FORMS}, got {form!r}")
        if stage not in STAGES:
            raise TypeError(f"combiner head: stage must be one of {STAGES}, got {stage!r}")
        self.form, self.stage = form, stage
        self.image_projection = nn.Sequential(nn.Linear(embed_dim, projection_dim), nn.ReLU(), nn.Dropout(dropout))
        self.text_projection = nn.Sequential(nn.Linear(embed_dim, projection_dim), nn.ReLU(), nn.Dropout(dropout))
        self.residual = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, embed_dim)
        )
        self.gate = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1)
        )
        if stage == "clip":  # the sum composes; unused weights must not reach the optimizer (nor DDP)
            self.requires_grad_(False)

    @property
    def frozen_backbone(self) -> bool:
        return self.stage == "combiner"

    def image_features(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return pooled if self.form == "clip4cir" else F.normalize(pooled, dim=-1)

    def text_features(self, pooled: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return pooled if self.form == "clip4cir" else F.normalize(pooled, dim=-1)

    def gallery_embeds(self, image_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_features, dim=-1)

    def text_embeds(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(text_features, dim=-1)

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        if self.stage == "clip":  # CLIP4Cir's first stage: the element-wise sum
            return F.normalize(image_features + text_features, dim=-1)
        image_part, text_part = self.image_projection(image_features), self.text_projection(text_features)  # (B, P) each
        parts = [text_part, image_part] if self.form == "clip4cir" else [image_part, text_part]
        combined = torch.cat(parts, dim=-1)  # (B, 2P)
        mix = torch.sigmoid(self.gate(combined))  # (B, 1)
        fused = self.residual(combined) + mix * text_features + (1.0 - mix) * image_features
        return F.normalize(fused, dim=-1)

    def training_losses(
        self,
        *,
        reference: torch.Tensor,
        text: torch.Tensor,
        target: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        scale = torch.full_like(logit_scale, CLIP4CIR_LOGIT_SCALE) if self.form == "clip4cir" else logit_scale
        query = self.compose(reference, text)
        return {"composed": batch_classification_loss(query, self.gallery_embeds(target), scale)}
