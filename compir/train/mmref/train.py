"""``train_mmref``: identities, optional reference-guided fine-tuning, the reference sidecar and its
mix weight chosen on val.

Steps: (1) encode the training split with the checkpoint and assign identities
(:mod:`~compir.train.mmref.identities`); (2) with ``finetune_steps`` > 0, fine-tune the model with its
own loss plus the reference-guided terms (:mod:`~compir.train.mmref.finetune`), write it as a new
checkpoint and re-encode; (3) fit the reference bank (:mod:`~compir.train.mmref.references`) on the
features of the checkpoint the sidecar belongs to; (4) choose weight and temperature on val.

Inference: a vector x goes to reference coordinates ``softmax(P(x) . R^T / tau)``; the
reference-based similarity of a query and a candidate is the cosine of their coordinates, mixed
with the first-stage cosine as ``(1 - weight) * cos + weight * ref_sim`` on the top-k. R, P, tau
and weight are what the export writes; the runtime needs numpy only. It applies to text -> image
queries too: a text vector is refined the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compir.contracts import sha256_file
from compir.data.load import load_split
from compir.data.types import CirSplit
from compir.errors import InputError
from compir.train.mmref.identities import IdentityAssignment, assign_identities, describe
from compir.train.mmref.references import Identities, caption_vectors, collect_identities, fit_references, reference_coordinates
from compir.train.neucore import stage2

KIND = "mmref"
WEIGHT_GRID = (0.0, 0.1, 0.2, 0.35, 0.5)
TEMPERATURE_GRID = (0.02, 0.05, 0.1)
FINETUNED_NAME = "mmref-finetuned.pt"


@dataclass(frozen=True)
class MMRefResult:
    path: Path  # the sidecar
    checkpoint: Path  # the checkpoint the sidecar belongs to: the input one, or the fine-tuned one
    references: int
    weight: float
    temperature: float
    val_before: dict[str, float]  # first stage of ``checkpoint`` on val
    val_after: dict[str, float]  # with the refinement at the chosen weight
    val_input: dict[str, float]  # first stage of the input checkpoint (= val_before without fine-tuning)
    identities: str  # the source that ran (dataset / scenes / clusters / img_set)
    images_per_identity: dict[int, int]
    finetune_losses: dict[str, float]


def train_mmref(
    checkpoint: str | Path, *, data: str | Path, out: str | Path | None = None,
    steps: int = 300, max_identities: int = 2048, top_n: int = 50, val_queries: int | None = None, train_queries: int | None = 3000,
    weight: float | None = None, temperature: float | None = None, seed: int = 0, progress: bool = True,
    identities: str = "auto", finetune_steps: int = 0, finetune_batch_size: int = 32, finetune_lr: float = 2e-4,
    finetuned_checkpoint: str | Path | None = None, finetune_reference_weight: float = 1.0, val_split: str = "val",
) -> MMRefResult:
    """Build MMRef for ``checkpoint`` from ``data``'s train split and write its sidecar.

    ``identities``: where object identities come from (auto / dataset / scenes / clusters / img_set).
    ``finetune_steps`` > 0 first fine-tunes the model with reference-guided learning and writes it
    to ``finetuned_checkpoint`` (default ``mmref-finetuned.pt`` beside ``checkpoint``); the sidecar
    then belongs to that checkpoint; ``finetune_reference_weight`` scales its reference-guided terms
    (0: the model's own loss only, the control that tells MMRef's effect from training longer).
    The sidecar goes to ``out`` (default ``<checkpoint stem>.mmref.pt`` beside the checkpoint it
    belongs to). Mix weight and temperature are chosen on ``val_split`` (Shoes has none: ``test``)
    unless given.
    """
    from compir.train.checkpoint import load_checkpoint, save_checkpoint
    from compir.train.mmref.finetune import finetune_with_references

    if finetune_steps < 0:
        raise InputError(f"--finetune-steps must be >= 0, got {finetune_steps}")
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    train_split = _limited(load_split(data, split="train"), train_queries)
    val = load_split(data, split=val_split)
    if val_queries:
        val = dataclasses.replace(val, queries=val.queries[:val_queries])
    members, assignment = _members(model, train_split, source=identities, max_identities=max_identities, seed=seed, progress=progress)
    print(describe(assignment))
    owner = Path(checkpoint)
    val_encoded = stage2.encode_for_stage2(model, val, progress=progress)
    val_input = dict(stage2.evaluate_scores(val, stage2.first_stage_scores(val_encoded)).metrics)
    losses: dict[str, float] = {}
    if finetune_steps:
        losses = finetune_with_references(model, train_split, identities=members, identity_of=assignment.of, steps=finetune_steps,
                                          batch_size=finetune_batch_size, lr=finetune_lr, weight=finetune_reference_weight, seed=seed,
                                          progress=progress)
        owner = Path(finetuned_checkpoint) if finetuned_checkpoint is not None else owner.with_name(FINETUNED_NAME)
        members, _ = _members(model, train_split, source=assignment.source, max_identities=max_identities, seed=seed,
                              progress=progress, fixed=assignment)
        val_encoded = stage2.encode_for_stage2(model, val, progress=progress)
    references, projection = fit_references(members, steps=steps, seed=seed, progress=progress)
    weight, temperature, before, after = choose_settings(
        val_encoded, references=references, projection=projection, top_n=top_n,
        fixed=None if weight is None else (weight, temperature or TEMPERATURE_GRID[1]),
    )
    if finetune_steps:
        save_checkpoint(owner, model=model, metrics=before, step=loaded.step + finetune_steps, epoch=loaded.epoch)
    owner_sha256 = sha256_file(owner) if finetune_steps else loaded.sha256
    path = Path(out) if out is not None else stage2.sidecar_path(owner, KIND)
    stage2.save_sidecar(
        path, kind=KIND, base_checkpoint_sha256=owner_sha256,
        config={"dim": int(references.shape[1]), "references": int(references.shape[0])},
        state_dict={"references": torch.from_numpy(references), "projection": torch.from_numpy(projection)},
        settings={"weight": weight, "temperature": temperature, "top_n": top_n},
        metrics={"val_before": before, "val_after": after, "val_input": val_input, "identities": len(members.names),
                 "identity_source": assignment.source, "finetune_steps": finetune_steps, "finetune_losses": losses},
    )
    return MMRefResult(
        path=path, checkpoint=owner, references=len(references), weight=weight, temperature=temperature, val_before=before,
        val_after=after, val_input=val_input, identities=assignment.source, images_per_identity=assignment.images_per_identity(),
        finetune_losses=losses,
    )


def _limited(split: CirSplit, train_queries: int | None) -> CirSplit:
    """The first ``train_queries`` queries and the images they use."""
    if not train_queries:
        return split
    queries = split.queries[:train_queries]
    keep = {q.reference for q in queries} | {t for q in queries for t in q.targets}
    return dataclasses.replace(split, queries=queries, gallery=tuple(n for n in split.gallery if n in keep))


def _members(
    model: Any, split: CirSplit, *, source: str, max_identities: int, seed: int, progress: bool,
    fixed: IdentityAssignment | None = None,
) -> tuple[Identities, IdentityAssignment]:
    """Encode ``split`` and group its members by identity (``fixed``: keep an earlier assignment)."""
    encoded = stage2.encode_for_stage2(model, split, progress=progress)
    images = sorted(encoded.image_row)
    assignment = fixed or assign_identities(
        split, source=source, images=images, image_embeds=encoded.image_embeds[[encoded.image_row[n] for n in images]], seed=seed,
    )
    encoded_captions = {n: c for n, c in split.captions.items() if n in encoded.image_row}
    captions = caption_vectors(model, dataclasses.replace(split, captions=encoded_captions))
    return collect_identities(encoded, identity_of=assignment.of, caption_vectors=captions, max_identities=max_identities), assignment


def refine_scores(encoded: stage2.EncodedSplit, first: np.ndarray, columns: list[np.ndarray], queries: np.ndarray, *,
                  references: np.ndarray, projection: np.ndarray, weight: float, temperature: float) -> np.ndarray:
    """Re-ranked (Q, G) scores: ``(1 - weight) * cos + weight * ref_sim`` on each query's top-N."""
    query_coords = reference_coordinates(queries, references=references, projection=projection, temperature=temperature)
    gallery = encoded.image_embeds[encoded.gallery_rows]
    gallery_coords = reference_coordinates(gallery, references=references, projection=projection, temperature=temperature)
    return stage2.rerank_matrix(first, columns, lambda q, c, s: (1 - weight) * s + weight * (gallery_coords[c] @ query_coords[q]))


def choose_settings(encoded: stage2.EncodedSplit, *, references: np.ndarray, projection: np.ndarray, top_n: int,
                    fixed: tuple[float, float] | None = None) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """(weight, temperature, val metrics before, after): the grid point with the best validation
    score, or ``fixed`` = (weight, temperature) whatever its score."""
    from compir.train.evaluation import selection_score

    first = stage2.first_stage_scores(encoded)
    columns = stage2.candidate_columns(encoded, first, top_n=top_n)
    before = stage2.evaluate_scores(encoded.split, first)
    best = (selection_score(before), 0.0, TEMPERATURE_GRID[0], before)
    grid = [(w, t) for t in TEMPERATURE_GRID for w in WEIGHT_GRID[1:]] if fixed is None else [fixed]
    for weight, temperature in grid:
        scores = refine_scores(encoded, first, columns, encoded.query_embeds, references=references, projection=projection,
                               weight=weight, temperature=temperature)
        report = stage2.evaluate_scores(encoded.split, scores)
        if fixed is not None or selection_score(report) > best[0]:
            best = (selection_score(report), weight, temperature, report)
    return best[1], best[2], dict(before.metrics), dict(best[3].metrics)
