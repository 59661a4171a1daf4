"""NEUCORE (Zhao & Xu 2024) as a stage-2 joint scorer of (reference r, modification m, candidate c).

Inputs are what an export already has at query time, so re-ranking needs no image re-encode:

- ``token_features`` (N, L, Wt): the text tower's word states of m, and ``input_ids`` (N, L);
- ``reference_features`` / ``candidate_features`` (N, K, D): the head's cached image features.
  A token-set head (TG-CIR: K attribute tokens) gives K local regions per image. A head with
  vector features (the combiner) gets ``region_grid`` x ``region_grid`` regions beside its vector
  (K = 1 + grid^2: the backbone's tokens pooled to a grid, :meth:`CIRModel.use_image_regions`),
  cached in the index with the features; with ``region_grid`` 0, (N, D) is read as K = 1.

Concepts: the noun / attribute phrases mined from m (:mod:`compir.concepts`); ``input_ids``
keeps their token positions and pads every other word (``concept_input_ids`` in training, the
runtime's NeucoreStage at query time), so the graph attends from the non-padding, non-special
positions. Each has a learned salience in (0, 1) on top.

Alignment: each concept attends over the 2K regions of the concatenation [r; c] (a concept to
add is found only in c). Weak labels from the triplet train it: image level (a concept of m is
expected in the target: its best-matching region in t must show it more than in the batch's
other targets) and sentence level (does the triple match: a softmax over the candidates).

Progressive fusion: starting from r's pooled regions, concepts are fused one at a time in text
order by one shared ("unified execution") gated block; the final state is scored against c.
Every row is one (r, m, c) triple: the graph's batch axis is the candidate axis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAD_ID = 0


@dataclass(frozen=True)
class NeucoreConfig:
    text_width: int  # Wt of the text tower's token states
    feature_dim: int  # D of one image region
    hidden_dim: int = 128
    sot_id: int = 49406
    eot_id: int = 49407
    region_grid: int = 0  # > 0: the image features carry grid x grid backbone regions (CIRModel.use_image_regions)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class NeucoreOutputs:
    scores: torch.Tensor  # (N,) joint score of each triple
    candidate_presence: torch.Tensor  # (N, L) logit: the concept is in c
    concept_mask: torch.Tensor  # (N, L) 1 for a concept token, 0 for special / padding (L of token_features)


def as_regions(features: torch.Tensor) -> torch.Tensor:
    """Cached image features -> regions (N, K, D): (N, D) vectors become one region each."""
    return features.unsqueeze(1) if features.dim() == 2 else features


class FusionBlock(nn.Module):
    """The shared block: state (N, H), attended region (N, H), concept (N, H) -> new state."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.update = nn.Sequential(nn.Linear(3 * hidden_dim, 2 * hidden_dim), nn.GELU(), nn.Linear(2 * hidden_dim, hidden_dim))
        self.gate = nn.Linear(3 * hidden_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, state: torch.Tensor, region: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([state, region, concept], dim=-1)
        return self.norm(state + torch.sigmoid(self.gate(joint)) * self.update(joint))


class ProgressiveFusion(nn.Module):
    """The concepts fused into the state one at a time, in text order, by the shared block; a
    position of weight 0 (padding, special tokens) leaves the state exactly as it was. Scriptable:
    the export scripts it, so the graph loops over however many positions it is given (an ONNX
    ``Loop``) instead of unrolling the traced count."""

    def __init__(self, block: FusionBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, state: torch.Tensor, attended: torch.Tensor, concepts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        for position in range(concepts.shape[1]):
            step = weight[:, position : position + 1]  # (N, 1)
            updated = self.block(state, attended[:, position], concepts[:, position])
            state = step * updated + (1.0 - step) * state
        return state


class NeucoreScorer(nn.Module):
    def __init__(self, config: NeucoreConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_dim
        self.text_projection = nn.Sequential(nn.LayerNorm(config.text_width), nn.Linear(config.text_width, hidden))
        self.image_projection = nn.Sequential(nn.LayerNorm(config.feature_dim), nn.Linear(config.feature_dim, hidden))
        self.segment = nn.Parameter(torch.zeros(2, hidden))  # which image of [r; c] a region is from
        self.salience = nn.Linear(hidden, 1)
        self.presence_scale = nn.Parameter(torch.tensor(5.0))
        self.presence_bias = nn.Parameter(torch.tensor(0.0))
        self.block = FusionBlock(hidden)
        self.score_head = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def concept_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        special = (input_ids == PAD_ID) | (input_ids == self.config.sot_id) | (input_ids == self.config.eot_id)
        return (~special).float()  # (N, L)

    def run(
        self,
        token_features: torch.Tensor,
        input_ids: torch.Tensor,
        reference_features: torch.Tensor,
        candidate_features: torch.Tensor,
        fusion: nn.Module | None = None,
    ) -> NeucoreOutputs:
        """``fusion``: a :class:`ProgressiveFusion` of this scorer's block to use (the export's scripted one)."""
        concepts = self.text_projection(token_features)  # (N, L, H)
        mask = self.concept_mask(input_ids[:, input_ids.shape[1] - token_features.shape[1] :])  # a CLS pooler drops token 0
        weight = torch.sigmoid(self.salience(concepts)).squeeze(-1) * mask  # (N, L)
        reference = self.image_projection(as_regions(reference_features)) + self.segment[0]  # (N, K, H)
        candidate = self.image_projection(as_regions(candidate_features)) + self.segment[1]  # (N, K, H)
        regions = torch.cat([reference, candidate], dim=1)  # (N, 2K, H)
        unit_c, unit_v = F.normalize(concepts, dim=-1), F.normalize(regions, dim=-1)
        cosine = unit_c @ unit_v.transpose(1, 2)  # (N, L, 2K)
        attended = (cosine * self.presence_scale).softmax(dim=-1) @ regions  # (N, L, H)
        k = reference.shape[1]
        presence = cosine * self.presence_scale + self.presence_bias
        fuse = fusion if fusion is not None else ProgressiveFusion(self.block)
        state = fuse(reference.mean(dim=1), attended, concepts, weight)  # from r's pooled regions (N, H)
        pooled = candidate.mean(dim=1)
        scores = self.score_head(torch.cat([state, pooled, state * pooled], dim=-1)).squeeze(-1)
        return NeucoreOutputs(
            scores=scores,
            candidate_presence=presence[..., k:].amax(dim=-1),
            concept_mask=mask,
        )

    def forward(
        self,
        token_features: torch.Tensor,
        input_ids: torch.Tensor,
        reference_features: torch.Tensor,
        candidate_features: torch.Tensor,
    ) -> torch.Tensor:
        """The exported graph: (N, L, Wt), (N, L), (N, K, D), (N, K, D) -> scores (N,)."""
        return self.run(token_features, input_ids, reference_features, candidate_features).scores
