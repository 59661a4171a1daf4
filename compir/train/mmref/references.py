"""MMRef's reference bank: references per object identity, fitted on a model's features.

An identity (see :mod:`compir.train.mmref.identities`) gathers images; its members are their
gallery vectors, their descriptions (``split.captions``) and every composed query (r, m) that
leads to one of them. Fitted on the (fine-tuned or given) checkpoint's features, all (D,) vectors:

- members of identity i: gallery vectors of its images, text vectors of its captions and
  composed query vectors of the queries targeting it; all go through a learned projection P
  (D -> D, identity at start) into the reference space;
- global fusion: attention pooling over the projected members plus a learnable per-identity
  residual gives reference_i (unit length);
- local reconstruction: a decoder must rebuild every projected member from reference_i and a
  modality embedding (the reference has to keep each member's details, not only their mean);
- reference-guided representation loss: each projected member must pick its own reference among
  the batch's references (InfoNCE both ways), plus the cross-modal alignment of queries /
  captions with their images in the projected space.

Inference (``refine``, :mod:`compir.train.mmref.train`): a vector x goes to reference coordinates ``softmax(P(x) . R^T / tau)``; the
reference-based similarity of a query and a candidate is the cosine of their coordinates, mixed
with the first-stage cosine as ``(1 - weight) * cos + weight * ref_sim`` on the top-k. R, P, tau
and weight (chosen on the validation split) are what the export writes; the runtime needs numpy
only. It applies to text -> image queries too: a text vector is refined the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compir.data.types import CirSplit
from compir.errors import DatasetError
from compir.train.neucore.stage2 import EncodedSplit

MODALITIES = ("image", "caption", "query")


@dataclass(frozen=True)
class Identities:
    """Member vectors of each identity: ``vectors[j]`` belongs to identity ``owner[j]``."""

    names: list[str]  # identity names (M,)
    vectors: np.ndarray  # (J, D) unit vectors
    owner: np.ndarray  # (J,) int64 identity index
    modality: np.ndarray  # (J,) int64 index into MODALITIES


class ReferenceBank(nn.Module):
    def __init__(self, *, dim: int, count: int) -> None:
        super().__init__()
        self.projection = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.projection.weight)
        self.attention = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))
        self.residual = nn.Parameter(torch.zeros(count, dim))  # the learnable part of each reference
        self.modality = nn.Parameter(torch.zeros(len(MODALITIES), dim))
        self.decoder = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(vectors), dim=-1)

    def fuse(self, projected: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
        """Global fusion: per identity, attention pooling of its members (J, D) -> (count, D)."""
        logits = self.attention(projected).squeeze(-1)  # (J,)
        logits = logits - logits.max()
        weights = logits.exp()
        total = torch.zeros(count, device=projected.device).index_add(0, owner, weights)
        pooled = torch.zeros(count, projected.shape[1], device=projected.device).index_add(0, owner, weights[:, None] * projected)
        return pooled / total.clamp(min=1e-12)[:, None]


def collect_identities(
    encoded: EncodedSplit, *, identity_of: dict[str, str], caption_vectors: dict[str, np.ndarray], max_identities: int | None = None,
) -> Identities:
    """Group an encoded split's images, captions and composed queries by identity (``identity_of``:
    image name -> identity; an image absent from it is its own identity)."""
    split = encoded.split
    identity_of = {name: identity_of.get(name, name) for name in encoded.image_row}
    names = sorted(set(identity_of.values()))
    if max_identities is not None and len(names) > max_identities:
        keep = np.random.default_rng(0).choice(len(names), size=max_identities, replace=False)
        names = [names[i] for i in sorted(keep)]
    index = {name: i for i, name in enumerate(names)}
    vectors, owner, modality = [], [], []

    def add(vector: np.ndarray, image: str, kind: str) -> None:
        if identity_of.get(image) in index:
            vectors.append(vector)
            owner.append(index[identity_of[image]])
            modality.append(MODALITIES.index(kind))

    for image, row in encoded.image_row.items():
        add(encoded.image_embeds[row], image, "image")
    for image, vector_set in caption_vectors.items():
        for vector in vector_set:
            add(vector, image, "caption")
    for q, query in enumerate(split.queries):
        for target in query.targets:
            add(encoded.query_embeds[q], target, "query")
    if not vectors:
        raise DatasetError(f"split {split.name!r} has no identities to build references from")
    return Identities(names=names, vectors=np.stack(vectors).astype(np.float32), owner=np.asarray(owner), modality=np.asarray(modality))


def caption_vectors(model: Any, split: CirSplit, *, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Text vectors of every image's captions (name -> (C, D)), for the caption members."""
    items = [(name, text) for name, texts in split.captions.items() for text in texts]
    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            ids = model.tokenizer([text for _, text in chunk])
            embeds = model.encode_text(ids)[0].float().numpy()
            for (name, _), vector in zip(chunk, embeds, strict=True):
                out.setdefault(name, []).append(vector)
    return {name: np.stack(vs) for name, vs in out.items()}


def fit_references(
    identities: Identities, *, steps: int = 300, batch_identities: int = 256, lr: float = 2e-3, temperature: float = 0.05,
    reconstruction_weight: float = 0.5, seed: int = 0, progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Train the reference bank; returns (references (M, D), projection (D, D): ref space = x @ P.T)."""
    torch.manual_seed(seed)
    count, dim = len(identities.names), identities.vectors.shape[1]
    bank = ReferenceBank(dim=dim, count=count)
    optimizer = torch.optim.AdamW(bank.parameters(), lr=lr, weight_decay=0.0)
    vectors = torch.from_numpy(identities.vectors)
    owner = torch.from_numpy(identities.owner)
    modality = torch.from_numpy(identities.modality)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(steps), desc="mmref", unit="step", disable=not progress):
        chosen = torch.from_numpy(rng.choice(count, size=min(batch_identities, count), replace=False))
        local = torch.full((count,), -1, dtype=torch.long)
        local[chosen] = torch.arange(len(chosen))
        rows = (local[owner] >= 0).nonzero().squeeze(-1)
        member_owner = local[owner[rows]]
        projected = bank.project(vectors[rows])  # (J, D)
        references = F.normalize(bank.fuse(projected, member_owner, len(chosen)) + bank.residual[chosen], dim=-1)
        logits = projected @ references.T / temperature  # (J, n)
        guided = F.cross_entropy(logits, member_owner)
        rebuilt = F.normalize(bank.decoder(references[member_owner] + bank.modality[modality[rows]]), dim=-1)
        reconstruction = (1.0 - (rebuilt * projected.detach()).sum(-1)).mean()
        loss = guided + reconstruction_weight * reconstruction + _alignment(projected, member_owner, modality[rows], temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        projected = bank.project(vectors)
        references = F.normalize(bank.fuse(projected, owner, count) + bank.residual, dim=-1)
    return references.numpy().astype(np.float32), bank.projection.weight.detach().numpy().astype(np.float32)


def _alignment(projected: torch.Tensor, owner: torch.Tensor, modality: torch.Tensor, temperature: float) -> torch.Tensor:
    """Non-image members must find an image of their own identity among the batch's images."""
    images = (modality == 0).nonzero().squeeze(-1)
    texts = (modality != 0).nonzero().squeeze(-1)
    if len(images) == 0 or len(texts) == 0:
        return projected.new_zeros(())
    logits = projected[texts] @ projected[images].T / temperature  # (T, I)
    positive = owner[texts][:, None] == owner[images][None, :]
    has = positive.any(dim=1)
    log_prob = logits.log_softmax(dim=1)
    return -(torch.logsumexp(log_prob.masked_fill(~positive, -1e4), dim=1)[has]).mean()


def reference_coordinates(vectors: np.ndarray, *, references: np.ndarray, projection: np.ndarray, temperature: float) -> np.ndarray:
    """(N, D) vectors -> unit-length soft assignments to the references (N, M); torch here, the
    runtime's numpy twin (compir.runtime.rerankers.mmref) is checked against it."""
    projected = F.normalize(torch.from_numpy(vectors).float() @ torch.from_numpy(projection).T, dim=-1)
    weights = (projected @ torch.from_numpy(references).T / temperature).softmax(dim=-1)
    return F.normalize(weights, dim=-1).numpy()
