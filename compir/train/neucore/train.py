"""Train NEUCORE on top of a frozen CIR checkpoint, with weak labels only, on synthetic data.

Each step samples fresh training queries (grouped by reference, so a reference's other edits
are in-batch hard negatives; held-out combinations never appear), encodes r, t and m with the
frozen model, and scores every (r_i, m_i, t_j) pair of the batch:

- sentence level: a softmax over the batch's candidates must pick t_i (the pair matches);
- image level (multiple-instance): a concept word of m is "in r" / "in t_j" when the word occurs
  in that scene's description; the concept's best-matching region in that image must say so.

The mix weight of the final score ``first-stage cosine + weight * neucore score`` is chosen on
the validation split (never the test split); weight 0 means NEUCORE did not help there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from compir.data.load import detect_format, load_split
from compir.data.synth_scene import render_scene_array, scene_caption
from compir.data.synthetic import synth_config_of
from compir.errors import InputError
from compir.train.neucore.model import NeucoreConfig, NeucoreScorer
from compir.train.neucore.stage2 import (
    EncodedSplit,
    Rescorer,
    candidate_columns,
    encode_for_stage2,
    evaluate_scores,
    first_stage_scores,
    rerank_matrix,
    save_sidecar,
    sidecar_path,
)
from compir.train.text import CLIP_BPE, tokenize
from compir.train.transforms import pixels_to_tensor

KIND = "neucore"
WEIGHT_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
_LONG_CONTEXT = 77  # whole scene descriptions, for the presence labels


@dataclass(frozen=True)
class NeucoreResult:
    path: Path
    weight: float  # chosen on validation
    val_before: dict[str, float]
    val_after: dict[str, float]
    steps: int


def train_neucore(
    checkpoint: str | Path,
    *,
    data: str | Path,
    out: str | Path | None = None,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    hidden_dim: int = 128,
    mil_weight: float = 0.5,
    top_n: int = 50,
    val_queries: int | None = None,
    weight: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> NeucoreResult:
    """Train a NEUCORE re-ranker for ``checkpoint`` on the synthetic dataset at ``data``; write its
    sidecar (default ``<checkpoint>.neucore.pt``) and return where and how well it did on val.

    ``weight``: the mix weight; None chooses it on the validation split (:data:`WEIGHT_GRID`)."""
    from compir.train.checkpoint import load_checkpoint
    from compir.train.sources import SyntheticSource

    if detect_format(data) != "synthetic":
        raise InputError(f"{data}: NEUCORE's weak labels come from scene descriptions; train it on a synthetic dataset")
    torch.manual_seed(seed)
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if model.tokenizer.kind != CLIP_BPE:  # its weak labels match CLIP BPE ids of queries and descriptions
        raise InputError(f"NEUCORE needs a model with the CLIP BPE tokenizer; {model.config.name!r} uses {model.tokenizer.kind!r}")
    settings = model.tokenizer.settings()
    scorer = NeucoreScorer(
        NeucoreConfig(
            text_width=int(model.config.clip_cfg["text_cfg"]["width"]),
            feature_dim=model.embed_dim,
            hidden_dim=hidden_dim,
            sot_id=int(settings["sot_id"]),
            eot_id=int(settings["eot_id"]),
        )
    )
    synth = synth_config_of(data)
    source = SyntheticSource(
        synth, preprocess=model.preprocess, tokenizer=model.tokenizer, batch_size=batch_size,
        steps_per_epoch=steps, seed=seed + 1009,
    )
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 1009])
    bar = tqdm(range(steps), desc="neucore", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + np.cos(np.pi * step / steps))
        losses = _step_losses(model, scorer, source.sample_queries(rng), mil_weight=mil_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in losses.items()})
    scorer.eval()
    val = load_split(data, split="val")
    if val_queries:
        val = dataclasses.replace(val, queries=val.queries[:val_queries])
    encoded = encode_for_stage2(model, val, progress=progress)
    weight, before, after = choose_weight(encoded, scorer, top_n=top_n, fixed=weight)
    path = Path(out) if out is not None else sidecar_path(checkpoint, KIND)
    save_sidecar(
        path, kind=KIND, base_checkpoint_sha256=loaded.sha256, config=scorer.config.to_dict(), state_dict=scorer.state_dict(),
        settings={"weight": weight, "top_n": top_n}, metrics={"val_before": before, "val_after": after, "steps": steps},
    )
    return NeucoreResult(path=path, weight=weight, val_before=before, val_after=after, steps=steps)


def _step_losses(model: Any, scorer: NeucoreScorer, queries: list[Any], *, mil_weight: float) -> dict[str, torch.Tensor]:
    batch = len(queries)
    size = model.config.image_size
    images = [Image.fromarray(render_scene_array(s, size=size)) for s in [q.reference for q in queries] + [q.target for q in queries]]
    ids = tokenize([q.text for q in queries], context_length=model.context_length)
    with torch.no_grad():
        _, features, _ = model.encode_image(pixels_to_tensor(images, model.preprocess))
        _, _, tokens = model.encode_text(ids)
    reference, target = features[:batch].float(), features[batch:].float()
    # Every (query i, candidate j) pair: rows i * B + j.
    rows = torch.arange(batch).repeat_interleave(batch)
    cols = torch.arange(batch).repeat(batch)
    out = scorer.run(tokens.float()[rows], ids[rows], reference[rows], target[cols])
    sentence = F.cross_entropy(out.scores.view(batch, batch), torch.arange(batch))
    in_reference = _presence(ids, [scene_caption(q.reference) for q in queries])  # (B, L)
    # The candidate side's label: is query i's concept word in candidate j's description?
    candidate_labels = _presence(ids[rows], [scene_caption(queries[int(j)].target) for j in cols])
    mask = out.concept_mask
    mil = _masked_bce(out.reference_presence, in_reference[rows], mask) + _masked_bce(out.candidate_presence, candidate_labels, mask)
    return {"total": sentence + mil_weight * mil, "sentence": sentence.detach(), "mil": mil.detach()}


def _presence(ids: torch.Tensor, descriptions: list[str]) -> torch.Tensor:
    """(N, L) 1.0 where token ids[n, l] occurs in the tokenized descriptions[n]."""
    described = tokenize(descriptions, context_length=_LONG_CONTEXT)  # (N, 77)
    return (ids.unsqueeze(-1) == described.unsqueeze(1)).any(dim=-1).float()


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def neucore_scores(scorer: NeucoreScorer, encoded: EncodedSplit, query: int, columns: np.ndarray) -> np.ndarray:
    """NEUCORE scores of query ``query`` against gallery ``columns`` (N,)."""
    gallery_rows = np.asarray(encoded.gallery_rows)[columns]
    reference_row = encoded.image_row[encoded.split.queries[query].reference]
    count = len(columns)
    tokens = torch.from_numpy(encoded.token_features[query : query + 1]).expand(count, -1, -1)
    ids = torch.from_numpy(encoded.input_ids[query : query + 1]).expand(count, -1)
    reference = torch.from_numpy(encoded.image_features[reference_row : reference_row + 1])
    reference = reference.expand(count, *reference.shape[1:])
    candidates = torch.from_numpy(encoded.image_features[gallery_rows])
    return scorer(tokens, ids, reference, candidates).numpy()


def _mixer(raw: list[np.ndarray], weight: float) -> Rescorer:
    def rescore(query: int, columns: np.ndarray, first: np.ndarray) -> np.ndarray:
        return first + weight * raw[query]

    return rescore


def choose_weight(
    encoded: EncodedSplit, scorer: NeucoreScorer, *, top_n: int, fixed: float | None = None
) -> tuple[float, dict[str, float], dict[str, float]]:
    """(weight, val metrics before, after): the weight of :data:`WEIGHT_GRID` with the best
    validation score (ties: the smaller), or ``fixed`` whatever its score."""
    from compir.train.evaluation import selection_score

    first = first_stage_scores(encoded)
    columns = candidate_columns(encoded, first, top_n=top_n)
    raw = [neucore_scores(scorer, encoded, q, cols) for q, cols in enumerate(columns)]
    before = evaluate_scores(encoded.split, first)
    best = (selection_score(before), 0.0, before)
    for weight in WEIGHT_GRID[1:] if fixed is None else (fixed,):
        report = evaluate_scores(encoded.split, rerank_matrix(first, columns, _mixer(raw, weight)))
        if fixed is not None or selection_score(report) > best[0]:
            best = (selection_score(report), weight, report)
    return best[1], dict(before.metrics), dict(best[2].metrics)
