"""The CLIP4Cir combiner (Baldrati et al.): a gated residual fusion of image and text vectors."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compir.train.heads import register_head
from compir.train.heads.base import CompositionHead
from compir.train.losses import batch_classification_loss


@register_head("combiner")
class CombinerHead(CompositionHead):
    """Features are the backbone's normalised pooled embeddings (B, E); tokens are unused.

    compose: project both (Linear, ReLU, Dropout), concatenate; a hidden layer gives a residual
    and a gate lambda = sigmoid(MLP(concat)) mixes lambda * text + (1 - lambda) * image.
    """

    loss_terms = ("composed",)

    def __init__(
        self,
        *,
        embed_dim: int,
        image_width: int,
        text_width: int,
        projection_dim: int = 512,
        hidden_dim: int = 1024,
        dropout: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, image_width=image_width, text_width=text_width)
        if options:
            raise TypeError(f"combiner head: unknown option(s) {sorted(options)}")
        self.image_projection = nn.Sequential(nn.Linear(embed_dim, projection_dim), nn.ReLU(), nn.Dropout(dropout))
        self.text_projection = nn.Sequential(nn.Linear(embed_dim, projection_dim), nn.ReLU(), nn.Dropout(dropout))
        self.residual = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, embed_dim)
        )
        self.gate = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1)
        )

    def image_features(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(pooled, dim=-1)

    def text_features(self, pooled: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return F.normalize(pooled, dim=-1)

    def gallery_embeds(self, image_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_features, dim=-1)

    def text_embeds(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(text_features, dim=-1)

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        combined = torch.cat(
            [self.image_projection(image_features), self.text_projection(text_features)], dim=-1
        )  # (B, 2P)
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
        query = self.compose(reference, text)
        return {"composed": batch_classification_loss(query, self.gallery_embeds(target), logit_scale)}
