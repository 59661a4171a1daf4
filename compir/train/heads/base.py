"""The interface every composition head implements (see the registry in ``__init__``).

A head turns the backbone's outputs into the three vectors retrieval needs: a gallery vector
per image, a text vector for text->image search, and a composed query vector for
(reference image, modification text). Every method is traceable (tensors in, tensors out), so
the export stage can put ``image_features`` / ``text_features`` / ``compose`` in separate graphs.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn


class CompositionHead(nn.Module, abc.ABC):
    """Base class of composition heads.

    Constructed with the backbone's dimensions: ``embed_dim`` E (pooled, projected embedding),
    ``image_width`` Wi (patch token width), ``text_width`` Wt (token width), plus the head's own
    options from the model config.
    """

    name: ClassVar[str] = ""
    # Names of the loss terms training_losses returns (the model config weighs them).
    loss_terms: ClassVar[tuple[str, ...]] = ()
    # The weights a model config gets when it names no others for this head (``compir train --head``).
    default_loss_weights: ClassVar[dict[str, float]] = {"composed": 1.0}
    # True: image_features gets the vision transformer's tokens before its final LayerNorm, class
    # token first (B, 1 + P, Wi); False: open_clip's normalised patch tokens (B, P, Wi).
    wants_raw_image_tokens: bool = False
    # True: the head composes through the text tower by textual inversion (Pic2Word: ``map_image`` gives a
    # pseudo-word token, CIRModel.encode_prompt reads it in a prompt); ``compose`` and ``training_losses`` do not apply.
    textual_inversion: ClassVar[bool] = False
    # True: gallery and text vectors are the backbone's own pooled embeddings, L2-normalised (the CLIP's space),
    # which ``compir train --objective clip`` trains and Pic2Word's mapping net reads.
    clip_space: ClassVar[bool] = False

    def __init__(self, *, embed_dim: int, image_width: int, text_width: int, **options: Any) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_width = image_width
        self.text_width = text_width

    @property
    def output_dim(self) -> int:
        """D, the width of gallery, text and query vectors."""
        return self.embed_dim

    @property
    def frozen_backbone(self) -> bool:
        """True when this head trains on frozen backbone features (CIRModel then freezes the towers)."""
        return False

    @abc.abstractmethod
    def image_features(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """pooled (B, E), patch tokens (B, P, Wi) (see ``wants_raw_image_tokens``) -> head-defined image features."""

    @abc.abstractmethod
    def text_features(self, pooled: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """pooled (B, E), token states (B, L, Wt), padding (B, L) bool (True: a pad token) -> head-defined text features."""

    @abc.abstractmethod
    def gallery_embeds(self, image_features: torch.Tensor) -> torch.Tensor:
        """Image features -> (B, D) L2-normalised gallery vectors (what the index stores)."""

    @abc.abstractmethod
    def text_embeds(self, text_features: torch.Tensor) -> torch.Tensor:
        """Text features -> (B, D) L2-normalised vectors for text-only (text->image) search."""

    @abc.abstractmethod
    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(reference image features, modification text features) -> (B, D) L2-normalised query."""

    @abc.abstractmethod
    def training_losses(
        self,
        *,
        reference: torch.Tensor,
        text: torch.Tensor,
        target: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms for a batch of (reference, text, target) features.

        Row i of each argument belongs to triplet i; the other rows' targets are negatives.
        """
