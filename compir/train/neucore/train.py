"""Train NEUCORE on top of a frozen CIR checkpoint, with weak labels from the triplets only.

Any dataset compir reads trains it (synthetic, FashionIQ, CIRR, Shoes): each step takes a batch
of training triplets (synthetic: fresh queries grouped by reference, so a reference's other edits
are in-batch hard negatives; real layouts: a random batch of the train split's labelled queries),
encodes r, t and m with the frozen model, and scores every (r_i, m_i, t_j) pair of the batch.
The labels come from the triplet itself, never from hidden annotations (the synthetic scenes'
descriptions are not read):

- sentence level: the pair (r_i, m_i) matches t_i, not t_j: a softmax over the batch's
  candidates must pick t_i;
- image level (multiple-instance): a concept phrase named by m_i (:mod:`compir.concepts`) is
  expected in t_i; its best-matching region in t_i must show it more than in any other t_j of
  the batch (a softmax over the candidates per concept token). No absolute negative is set
  for t_j (another target may show the concept too; only its pair does not match), and none
  for r (whether r already shows a concept is not in the triplet: "make the red one blue").

The mix weight of the final score ``first-stage cosine + weight * neucore score`` is chosen on
the validation split (never the test split); weight 0 means NEUCORE did not help there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from compir.concepts import concept_ids, concept_ids_from_offsets
from compir.data.load import detect_format, load_split
from compir.data.synth_scene import render_scene_array
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
from compir.train.text import HF, TextTokenizer
from compir.train.transforms import eval_transform, pixels_to_tensor, split_pixels

KIND = "neucore"
WEIGHT_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class Triplets:
    """One training batch: reference and target pixels (B, 3, S, S) and the modification texts."""

    reference: torch.Tensor
    target: torch.Tensor
    texts: list[str]


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
    val_split: str = "val",
    weight: float | None = None,
    regions: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> NeucoreResult:
    """Train a NEUCORE re-ranker for ``checkpoint`` on the dataset at ``data`` (any format compir
    reads); write its sidecar (default ``<checkpoint>.neucore.pt``) and return where and how well
    it did on ``val_split``.

    ``weight``: the mix weight; None chooses it on ``val_split`` (:data:`WEIGHT_GRID`). ``regions``:
    for a head without local tokens, attend over its vector and a ``regions`` x ``regions`` grid of
    the backbone's image tokens (0: its vector alone); the export then caches them in the index."""
    from compir.train.checkpoint import load_checkpoint

    torch.manual_seed(seed)
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    grid = model.use_image_regions(regions)  # a vector head (the combiner) gets backbone regions; TG-CIR keeps its tokens
    settings = model.tokenizer.settings()
    scorer = NeucoreScorer(
        NeucoreConfig(
            text_width=model.text_width,
            feature_dim=model.embed_dim,
            hidden_dim=hidden_dim,
            sot_id=int(settings["sot_id"]),
            eot_id=int(settings["eot_id"]),
            region_grid=grid,
        )
    )
    sample = _sampler(model, data, batch_size=batch_size, seed=seed)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 1009])
    bar = tqdm(range(steps), desc="neucore", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + np.cos(np.pi * step / steps))
        losses = _step_losses(model, scorer, sample(rng), mil_weight=mil_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in losses.items()})
    scorer.eval()
    val = load_split(data, split=val_split)
    if val_queries:
        val = dataclasses.replace(val, queries=val.queries[:val_queries])
    encoded = encode_for_stage2(model, val, progress=progress)
    with torch.no_grad():
        concepts = concept_input_ids(model.tokenizer, scorer, [q.text for q in val.queries])
    encoded = dataclasses.replace(encoded, input_ids=concepts.numpy())  # the graph attends from the concepts only
    weight, before, after = choose_weight(encoded, scorer, top_n=top_n, fixed=weight)
    path = Path(out) if out is not None else sidecar_path(checkpoint, KIND)
    save_sidecar(
        path, kind=KIND, base_checkpoint_sha256=loaded.sha256, config=scorer.config.to_dict(), state_dict=scorer.state_dict(),
        settings={"weight": weight, "top_n": top_n}, metrics={"val_before": before, "val_after": after, "steps": steps},
    )
    return NeucoreResult(path=path, weight=weight, val_before=before, val_after=after, steps=steps)


def _sampler(model: Any, data: str | Path, *, batch_size: int, seed: int) -> Callable[[np.random.Generator], Triplets]:
    """A function drawing one training batch of ``data``: synthetic queries are rendered fresh,
    a real layout's train split is read from its files."""
    size = model.config.image_size
    if detect_format(data) == "synthetic":
        from compir.train.sources import SyntheticSource

        source = SyntheticSource(synth_config_of(data), preprocess=model.preprocess, tokenizer=model.tokenizer,
                                 batch_size=batch_size, steps_per_epoch=1, seed=seed + 1009)

        def synthetic(rng: np.random.Generator) -> Triplets:
            queries = source.sample_queries(rng)
            pixels = pixels_to_tensor([Image.fromarray(render_scene_array(s, size=size))
                                       for s in [q.reference for q in queries] + [q.target for q in queries]], model.preprocess)
            return Triplets(pixels[: len(queries)], pixels[len(queries) :], [q.text for q in queries])

        return synthetic
    split = load_split(data, split="train")
    labelled = [q for q in split.queries if q.targets]
    if len(labelled) < 2:
        raise InputError(f"{data}: NEUCORE needs at least 2 labelled training queries (in-batch candidates); found {len(labelled)}")
    count = min(batch_size, len(labelled))
    transform = eval_transform(model.preprocess)

    def real(rng: np.random.Generator) -> Triplets:
        chosen = [labelled[int(i)] for i in rng.choice(len(labelled), size=count, replace=False)]
        return Triplets(split_pixels(split, [q.reference for q in chosen], transform),
                        split_pixels(split, [q.targets[0] for q in chosen], transform), [q.text for q in chosen])

    return real


def concept_input_ids(tokenizer: Callable[[list[str]], torch.Tensor], scorer: NeucoreScorer, texts: list[str], *,
                      ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) ids of ``texts`` with every position outside a mined concept set to padding: the
    graph's ``input_ids`` (it attends from the non-padding, non-special positions). A Hugging Face
    tokenizer maps the concept words by its tokens' character offsets, CLIP's BPE by token counts.
    ``ids``: ``tokenizer(texts)`` when the caller has it already."""
    ids = tokenizer(texts) if ids is None else ids
    if isinstance(tokenizer, TextTokenizer) and tokenizer.kind == HF:
        rows = [concept_ids_from_offsets(row.numpy(), *tokenizer.offsets(text)) for row, text in zip(ids, texts, strict=True)]
        return torch.from_numpy(np.stack(rows))

    @functools.cache
    def token_count(piece: str) -> int:  # a word repeats across a batch's texts: tokenized once
        return int(scorer.concept_mask(tokenizer([piece]))[0].sum())

    first = 1 if int(ids[0, 0]) == scorer.config.sot_id else 0
    rows = [concept_ids(row.numpy(), text, token_count, first=first) for row, text in zip(ids, texts, strict=True)]
    return torch.from_numpy(np.stack(rows))


def _step_losses(model: Any, scorer: NeucoreScorer, batch: Triplets, *, mil_weight: float) -> dict[str, torch.Tensor]:
    count = len(batch.texts)
    ids = model.tokenizer(batch.texts)
    concepts = concept_input_ids(model.tokenizer, scorer, batch.texts, ids=ids)
    with torch.no_grad():
        _, features, _ = model.encode_image(torch.cat([batch.reference, batch.target]))
        _, _, tokens = model.encode_text(ids)
    reference, target = features[:count].float(), features[count:].float()
    # Every (query i, candidate j) pair: rows i * B + j.
    rows = torch.arange(count).repeat_interleave(count)
    cols = torch.arange(count).repeat(count)
    out = scorer.run(tokens.float()[rows], concepts[rows], reference[rows], target[cols])
    sentence = F.cross_entropy(out.scores.view(count, count), torch.arange(count))
    mil = concept_in_target_loss(out.candidate_presence.view(count, count, -1), out.concept_mask.view(count, count, -1)[:, 0])
    return {"total": sentence + mil_weight * mil, "sentence": sentence.detach(), "mil": mil.detach()}


def concept_in_target_loss(presence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image-level MIL loss. ``presence`` (B, B, L): concept l of query i in candidate j (max over
    j's regions); ``mask`` (B, L): the concept positions. Each concept of m_i must be shown by
    t_i more than by any other in-batch target (a softmax over j), averaged over the concepts."""
    count = presence.shape[0]
    logits = presence.permute(0, 2, 1).reshape(-1, count)  # (B * L, B): query i's concept l over candidates j
    labels = torch.arange(count).repeat_interleave(presence.shape[2])
    loss = F.cross_entropy(logits, labels, reduction="none")
    flat = mask.reshape(-1)
    return (loss * flat).sum() / flat.sum().clamp(min=1.0)


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
