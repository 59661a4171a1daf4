"""Pic2Word (Saito et al., CVPR 2023): zero-shot composition by textual inversion, trained on images only.

The mapping net (the authors' ``IM2TEXT``) turns a reference image's CLIP embedding into one pseudo-word
token; the frozen text tower reads a prompt whose placeholder word ``*`` is replaced by that token
(:meth:`compir.train.model.CIRModel.encode_prompt`), and its embedding is the query. No triplet, no caption:

    layers  two blocks of Linear(in, H) -> Dropout(p) -> ReLU   (in = E for the first, H after; H = 512)
    fc_out  Linear(H, Wt)                                       (Wt: the text tower's token width)

Training (:meth:`inversion_loss`): both towers frozen; for a batch of images, the image embeddings and the
embeddings of the prompt ``a photo of *`` (the mapped token in place of ``*``), both L2-normalised, meet in
CLIP's symmetric cross-entropy scaled by the frozen CLIP's logit scale. The mapping net takes the raw
(unnormalised) image embedding, as the authors' ``img2text(model.encode_image(images))``.

Gallery and text-only vectors are the CLIP's own normalised embeddings; :meth:`compose` does not apply
(composition runs through the text tower, not on text features).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compir.train.heads import register_head
from compir.train.heads.base import CompositionHead
from compir.train.losses import symmetric_contrastive_loss


@register_head("pic2word")
class Pic2WordHead(CompositionHead):
    """Features are the backbone's raw pooled embeddings (B, E); :meth:`map_image` gives (B, Wt) pseudo tokens.

    Options: ``hidden_dim`` H (512), ``layers`` (2), ``dropout`` (0.1): the authors' defaults.
    """

    loss_terms = ("inversion",)
    default_loss_weights: ClassVar[dict[str, float]] = {"inversion": 1.0}
    textual_inversion: ClassVar[bool] = True
    clip_space: ClassVar[bool] = True

    def __init__(
        self, *, embed_dim: int, image_width: int, text_width: int, hidden_dim: int = 512, layers: int = 2,
        dropout: float = 0.1, **options: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, image_width=image_width, text_width=text_width)
        if options:
            raise TypeError(f"pic2word head: unknown option(s) {sorted(options)}")
        if layers < 1:
            raise TypeError(f"pic2word head: layers must be >= 1, got {layers}")
        blocks: list[nn.Module] = []
        width = embed_dim
        for _ in range(layers):
            blocks.append(nn.Sequential(nn.Linear(width, hidden_dim), nn.Dropout(dropout), nn.ReLU()))
            width = hidden_dim
        self.layers = nn.Sequential(*blocks)
        self.fc_out = nn.Linear(hidden_dim, text_width)

    @property
    def frozen_backbone(self) -> bool:
        return True

    def image_features(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return pooled

    def text_features(self, pooled: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return pooled

    def gallery_embeds(self, image_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_features, dim=-1)

    def text_embeds(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(text_features, dim=-1)

    def map_image(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, E) raw image embeddings -> (B, Wt) pseudo-word token embeddings (the authors' IM2TEXT)."""
        return self.fc_out(self.layers(image_features))

    def inversion_loss(self, image_features: torch.Tensor, prompt_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """Pic2Word's loss: image embeddings vs the embeddings of ``a photo of *`` with each image's token (both (B, D))."""
        return symmetric_contrastive_loss(F.normalize(image_features, dim=-1), F.normalize(prompt_embeds, dim=-1), logit_scale)

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("pic2word composes through the text tower: CIRModel.encode_prompt(prompt ids, map_image(...))")

    def training_losses(
        self, *, reference: torch.Tensor, text: torch.Tensor, target: torch.Tensor, logit_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError("pic2word trains on images only (CIRModel.inversion_losses), not on triplets")
