"""What every stage-2 method (NEUCORE, MMRef) shares: the sidecar file format, encoding a split
with a frozen CIR model, re-scoring the first stage's top-N and evaluating the result.

Sidecar: a re-ranker is trained on top of a frozen checkpoint and saved beside it as
``<checkpoint stem>.<kind>.pt`` (``torch.save`` of a dict, read back with ``weights_only=True``)::

    format "compir.reranker", schema_version 1, kind ("neucore" | "mmref"),
    base_checkpoint_sha256   the checkpoint whose features it was trained on (checked on load)
    config                   constructor arguments
    state_dict               weights
    settings                 inference settings chosen on the validation split (mix weights ...)
    metrics                  validation figures before / after re-ranking

Evaluation: a re-ranked score matrix S (Q, G) is evaluated by :func:`compir.metrics.evaluate_split`
itself, with ``query_embeds = S`` and ``gallery_embeds = I`` (so Q @ G.T = S): the same protocol,
reference removal and pessimistic ties as the first stage.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from compir import __version__
from compir.contracts import atomic_output_path, check_header, require_keys, sha256_file
from compir.data.types import CirSplit
from compir.errors import ContractError
from compir.metrics import EvalReport, evaluate_split
from compir.train.transforms import eval_transform, split_pixels

SIDECAR_FORMAT = "compir.reranker"
SIDECAR_SCHEMA = 1


@dataclass(frozen=True)
class Sidecar:
    kind: str
    base_checkpoint_sha256: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    settings: dict[str, Any]
    metrics: dict[str, Any]
    path: Path


def sidecar_path(checkpoint: str | Path, kind: str) -> Path:
    """Where the ``kind`` re-ranker of ``checkpoint`` lives: ``run/best.pt`` -> ``run/best.<kind>.pt``."""
    source = Path(checkpoint)
    return source.with_name(f"{source.stem}.{kind}.pt")


def save_sidecar(
    path: str | Path,
    *,
    kind: str,
    base_checkpoint_sha256: str,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    settings: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    record = {
        "format": SIDECAR_FORMAT,
        "schema_version": SIDECAR_SCHEMA,
        "compir_version": __version__,
        "kind": kind,
        "base_checkpoint_sha256": base_checkpoint_sha256,
        "config": config,
        "state_dict": {key: value.detach().cpu() for key, value in state_dict.items()},
        "settings": settings,
        "metrics": metrics,
    }
    with atomic_output_path(path) as tmp:
        torch.save(record, tmp)


def load_sidecar(path: str | Path, *, kind: str, checkpoint_sha256: str | None = None) -> Sidecar:
    """Read a re-ranker sidecar; ContractError when missing, damaged, of another kind, or trained
    on another checkpoint than ``checkpoint_sha256``."""
    source = Path(path)
    if not source.is_file():
        raise ContractError(f"re-ranker file {source} does not exist; train it with `compir.train.{kind}`")
    try:
        record = torch.load(source, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as exc:
        raise ContractError(f"re-ranker file {source} is damaged ({type(exc).__name__}); train it again") from exc
    check_header(record, fmt=SIDECAR_FORMAT, schema_version=SIDECAR_SCHEMA, source=str(source))
    require_keys(record, ["kind", "base_checkpoint_sha256", "config", "state_dict", "settings"], source=str(source))
    if record["kind"] != kind:
        raise ContractError(f"{source} holds a {record['kind']!r} re-ranker, expected {kind!r}")
    if checkpoint_sha256 is not None and record["base_checkpoint_sha256"] != checkpoint_sha256:
        raise ContractError(
            f"{source} was trained on another checkpoint (sha256 {str(record['base_checkpoint_sha256'])[:12]}..., "
            f"this one is {checkpoint_sha256[:12]}...); train the re-ranker on this checkpoint"
        )
    return Sidecar(
        kind=kind,
        base_checkpoint_sha256=str(record["base_checkpoint_sha256"]),
        config=dict(record["config"]),
        state_dict=dict(record["state_dict"]),
        settings=dict(record["settings"]),
        metrics=dict(record.get("metrics", {})),
        path=source,
    )


# ---- encoding a split with the frozen model ----------------------------------------------------
@dataclass(frozen=True)
class EncodedSplit:
    """A split through a frozen CIR model: every image once, every query text once (numpy)."""

    split: CirSplit
    image_row: dict[str, int]  # image name -> row of the image arrays
    image_embeds: np.ndarray  # (I, D) gallery vectors
    image_features: np.ndarray  # (I, *F) head features (what the gallery caches)
    query_embeds: np.ndarray  # (Q, D) composed queries
    text_embeds: np.ndarray  # (Q, D) text-only queries
    input_ids: np.ndarray  # (Q, L)
    token_features: np.ndarray  # (Q, L, Wt)

    @property
    def gallery_rows(self) -> list[int]:
        return [self.image_row[name] for name in self.split.gallery]

    def reference_rows(self) -> list[int]:
        return [self.image_row[q.reference] for q in self.split.queries]


@torch.no_grad()
def encode_for_stage2(model: Any, split: CirSplit, *, batch_size: int = 64, progress: bool = True) -> EncodedSplit:
    """Encode ``split`` with a (frozen) CIRModel on CPU."""
    model.eval()
    transform = eval_transform(model.preprocess)
    names = sorted(set(split.gallery) | {q.reference for q in split.queries})
    embeds, features = [], []
    for start in tqdm(range(0, len(names), batch_size), desc="stage 2: images", disable=not progress, leave=False):
        chunk = names[start : start + batch_size]
        pixels = split_pixels(split, chunk, transform)
        image_embeds, image_features, _ = model.encode_image(pixels)
        embeds.append(image_embeds.float())
        features.append(image_features.float())
    all_features = torch.cat(features)
    row = {name: i for i, name in enumerate(names)}
    ids = model.tokenizer([q.text for q in split.queries])
    composed, texts, tokens = [], [], []
    for start in tqdm(range(0, len(ids), batch_size), desc="stage 2: queries", disable=not progress, leave=False):
        chunk_ids = ids[start : start + batch_size]
        text_embeds, text_features, token_features = model.encode_text(chunk_ids)
        references = all_features[[row[q.reference] for q in split.queries[start : start + batch_size]]]
        composed.append(model.compose(references, text_features).float())
        texts.append(text_embeds.float())
        tokens.append(token_features.float())
    return EncodedSplit(
        split=split,
        image_row=row,
        image_embeds=torch.cat(embeds).numpy(),
        image_features=all_features.numpy(),
        query_embeds=torch.cat(composed).numpy(),
        text_embeds=torch.cat(texts).numpy(),
        input_ids=ids.numpy(),
        token_features=torch.cat(tokens).numpy(),
    )


# ---- re-scoring and evaluation -------------------------------------------------------------------
# rescore(query index, candidate gallery columns (N,), first-stage scores (N,)) -> new scores (N,)
Rescorer = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def first_stage_scores(encoded: EncodedSplit, *, queries: np.ndarray | None = None) -> np.ndarray:
    """(Q, G) cosine of each query (composed by default) with the split's gallery."""
    vectors = encoded.query_embeds if queries is None else queries
    return (vectors @ encoded.image_embeds[encoded.gallery_rows].T).astype(np.float32)


def candidate_columns(encoded: EncodedSplit, scores: np.ndarray, *, top_n: int) -> list[np.ndarray]:
    """Per query, the gallery columns of its first-stage top-N, the reference left out (as the runtime does)."""
    column = {name: j for j, name in enumerate(encoded.split.gallery)}
    out = []
    for q, query in enumerate(encoded.split.queries):
        row = scores[q].copy()
        if query.reference in column:
            row[column[query.reference]] = -np.inf
        out.append(np.argsort(-row, kind="stable")[:top_n])
    return out


def rerank_matrix(scores: np.ndarray, columns: Sequence[np.ndarray], rescore: Rescorer) -> np.ndarray:
    """``scores`` with each query's top-N re-ordered by ``rescore`` and lifted above the rest."""
    out = scores.copy()
    lift = float(np.max(np.abs(scores))) + 1.0
    for q, cols in enumerate(columns):
        new = np.asarray(rescore(q, cols, scores[q, cols]), dtype=np.float64)
        order = np.argsort(-new, kind="stable")
        # Rank-preserving values in (lift, lift + 1]: top-N stay above everything else.
        out[q, cols[order]] = lift + 1.0 - np.arange(len(cols)) / max(1, len(cols))
    return out


def evaluate_scores(split: CirSplit, scores: np.ndarray) -> EvalReport:
    """The split's protocol on a (Q, G) score matrix over ``split.gallery`` (see the module docstring)."""
    identity = np.eye(scores.shape[1], dtype=np.float32)
    return evaluate_split(split, query_embeds=scores.astype(np.float32), gallery_embeds=identity, gallery_names=list(split.gallery))


def checkpoint_sha256(path: str | Path) -> str:
    return sha256_file(path)
