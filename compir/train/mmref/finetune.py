"""MMRef's reference-guided representation learning: fine-tune the CIR model's encoders and head.

Starting from a checkpoint, each step takes a batch of training triplets (r, m, t) and adds to the
model's own loss (its head's terms and the caption term, weighted as in its config) the
reference-guided terms, on the live features of the triplet's members of t's identity:

- references: one per identity, its global fusion (the mean of its members' unit vectors under the
  starting model, fixed) plus a learnable residual, unit length ((M, D), see ``ReferenceBank``);
- guided: the target's gallery vector, the composed query and the target's caption must each pick
  their identity's reference among all M (cross-entropy at ``temperature``), so the encoders move
  every member towards the object's reference;
- local reconstruction: a decoder rebuilds each member (detached) from its reference and a
  modality embedding, so a reference keeps each member's details rather than only their mean.

Every model weight trains (the towers too: this is what makes MMRef change the features the index
stores); the result is a new checkpoint, loadable and exportable as any other.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from compir.data.types import CirSplit, Query
from compir.errors import DatasetError
from compir.train.losses import weighted_loss
from compir.train.mmref.references import MODALITIES, Identities, ReferenceBank
from compir.train.model import CIRModel
from compir.train.optim import build_optimizer, lr_factor, set_lr
from compir.train.towers import tower_kernels
from compir.train.transforms import eval_transform, split_pixels

RECONSTRUCTION_WEIGHT = 0.5


def finetune_with_references(
    model: CIRModel, split: CirSplit, *, identities: Identities, identity_of: dict[str, str], steps: int,
    batch_size: int = 32, lr: float = 2e-4, weight: float = 1.0, temperature: float = 0.05, seed: int = 0, progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place for ``steps`` steps; returns the mean of each loss term over the last
    quarter of the steps. ``identities`` (from the starting model's features) fix the references'
    fusion and their order; ``identity_of`` maps an image name to its identity."""
    index = {name: i for i, name in enumerate(identities.names)}
    queries = [q for q in split.queries if q.targets and identity_of.get(q.targets[0], q.targets[0]) in index]
    if len(queries) < 2:
        raise DatasetError(f"split {split.name!r}: fewer than two training queries lead to an identity; nothing to fine-tune on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    count = len(identities.names)
    bank = ReferenceBank(dim=identities.vectors.shape[1], count=count)
    fused = _fused(identities)  # (M, D) the starting model's global fusion, fixed
    model.train()
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.0)
    bank_optimizer = torch.optim.AdamW(list(bank.parameters()), lr=10 * lr, weight_decay=0.0)
    transform = eval_transform(model.preprocess)
    weights = model.config.loss_weights
    history: list[dict[str, float]] = []
    with tower_kernels(model.backbone.visual, model.backbone.logit_scale.device):  # forward and backward
        for step in tqdm(range(steps), desc="mmref fine-tune", unit="step", disable=not progress):
            batch = _sample(queries, rng, batch_size)
            reference = split_pixels(split, [q.reference for q in batch], transform)
            target = split_pixels(split, [q.targets[0] for q in batch], transform)
            input_ids = model.tokenizer([q.text for q in batch])
            captions = [split.captions.get(q.targets[0], ("",))[0] for q in batch]
            caption_ids = model.tokenizer(captions) if all(captions) else None
            terms = model(reference, input_ids, target, caption_ids)
            own = weighted_loss(terms, weights)
            owner = torch.tensor([index[identity_of.get(q.targets[0], q.targets[0])] for q in batch])
            members, member_owner, modality = _members(model, reference, input_ids, target, caption_ids, owner)
            references = F.normalize(fused + bank.residual, dim=-1)  # (M, D)
            guided = F.cross_entropy(members @ references.T / temperature, member_owner)
            rebuilt = F.normalize(bank.decoder(references[member_owner] + bank.modality[modality]), dim=-1)
            reconstruction = (1.0 - (rebuilt * members.detach()).sum(-1)).mean()
            loss = own + weight * (guided + RECONSTRUCTION_WEIGHT * reconstruction)
            set_lr(optimizer, lr_factor(step=step, progress=step / max(1, steps), warmup_steps=max(1, steps // 10)))
            optimizer.zero_grad(set_to_none=True)
            bank_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            bank_optimizer.step()
            history.append({"own": float(own.detach()), "guided": float(guided.detach()), "reconstruction": float(reconstruction.detach())})
    model.eval()
    tail = history[-max(1, len(history) // 4) :]
    return {name: float(np.mean([h[name] for h in tail])) for name in ("own", "guided", "reconstruction")} if tail else {}


def _members(
    model: CIRModel, reference: torch.Tensor, input_ids: torch.Tensor, target: torch.Tensor, caption_ids: torch.Tensor | None,
    owner: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's members of the targets' identities: (J, D) unit vectors, (J,) owner, (J,) modality."""
    parts = [model.encode_image(target)[0], model.encode_query(reference, input_ids)]
    kinds = [MODALITIES.index("image"), MODALITIES.index("query")]
    if caption_ids is not None:
        parts.append(model.encode_text(caption_ids)[0])
        kinds.append(MODALITIES.index("caption"))
    members = F.normalize(torch.cat(parts).float(), dim=-1)  # (J, D), J = B x len(parts)
    modality = torch.tensor(kinds).repeat_interleave(len(owner))
    return members, owner.repeat(len(parts)), modality


def _fused(identities: Identities) -> torch.Tensor:
    """(M, D) mean of each identity's member vectors, unit length."""
    sums = np.zeros((len(identities.names), identities.vectors.shape[1]), dtype=np.float32)
    np.add.at(sums, identities.owner, identities.vectors)
    return F.normalize(torch.from_numpy(sums), dim=-1)


def _sample(queries: list[Query], rng: np.random.Generator, size: int) -> list[Query]:
    """Up to ``size`` queries with distinct targets (an in-batch duplicate target is a false negative)."""
    chosen: list[Query] = []
    seen: set[str] = set()
    for i in rng.permutation(len(queries)):
        if queries[i].targets[0] not in seen:
            seen.add(queries[i].targets[0])
            chosen.append(queries[i])
            if len(chosen) == size:
                break
    return chosen
