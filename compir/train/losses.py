"""Contrastive losses shared by the composition heads and the training loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_classification_loss(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP4Cir's batch-based classification: row i of ``queries`` must pick key i.

    queries, keys: (B, D) L2-normalised; the other B-1 keys of the batch are the negatives.
    ``logit_scale`` is the (already exponentiated) temperature.
    """
    logits = logit_scale * queries @ keys.T  # (B, B)
    labels = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits.float(), labels)


def symmetric_contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: the mean of a->b and b->a batch classification (a, b: (B, D) normalised)."""
    return 0.5 * (batch_classification_loss(a, b, logit_scale) + batch_classification_loss(b, a, logit_scale))


def weighted_loss(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The model's named loss terms summed with its config's ``loss_weights`` (1 for a term not named)."""
    loss = sum(weights.get(name, 1.0) * value.float() for name, value in terms.items())
    assert isinstance(loss, torch.Tensor), "a model returns at least one loss term"
    return loss
