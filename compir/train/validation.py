"""What ``compir train`` validates after each epoch, per objective: one :class:`ValResult` per call.

- :class:`TripletValidation`: composed recall on a split with triplets, beside the training-free baselines
  (the supervised heads; a zero-shot head through its prompt, see :mod:`compir.train.evaluation`);
- :class:`PairRecall`: text -> image recall on held-out image-caption pairs (``--objective clip``);
- :class:`InversionLoss`: Pic2Word's loss on held-out images (a zero-shot head on a plain photo folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from compir.data.types import CirSplit
from compir.images import load_image
from compir.train.evaluation import evaluate_model, in_chunks, query_modes, selection_score
from compir.train.model import CIRModel
from compir.train.transforms import eval_transform

RECALL_AT = (1, 5, 10)


@dataclass(frozen=True)
class ValResult:
    metrics: dict[str, float]  # what train_log.json and the checkpoint record
    score: float  # higher is better: picks best.pt
    baselines: dict[str, dict[str, float]]  # query mode -> metrics (triplet data only)


class Validation(Protocol):
    def __call__(self, model: CIRModel, *, device: torch.device, progress: bool) -> ValResult: ...


@dataclass(frozen=True)
class TripletValidation:
    """Composed recall on ``split`` (the first ``queries`` queries), baselines beside it."""

    split: CirSplit

    @classmethod
    def first(cls, split: CirSplit, queries: int | None) -> TripletValidation:
        return cls(replace(split, queries=split.queries[:queries]) if queries else split)

    def __call__(self, model: CIRModel, *, device: torch.device, progress: bool) -> ValResult:
        reports = evaluate_model(model, self.split, modes=query_modes(model), device=device, progress=progress)
        composed = reports["composed"]
        baselines = {mode: dict(report.metrics) for mode, report in reports.items() if mode != "composed"}
        return ValResult(dict(composed.metrics), selection_score(composed), baselines)


@dataclass(frozen=True)
class PairRecall:
    """Text -> image R@1/5/10 on held-out pairs: each caption ranks all the held-out images."""

    paths: tuple[Path, ...]
    captions: tuple[str, ...]

    def __call__(self, model: CIRModel, *, device: torch.device, progress: bool) -> ValResult:
        metrics = text_to_image_recall(model, self.paths, self.captions, device=device, progress=progress)
        return ValResult(metrics, float(np.mean(list(metrics.values()))), {})


@dataclass(frozen=True)
class InversionLoss:
    """Pic2Word's loss (image vs ``a photo of *`` with its own token) on held-out images; score = -loss."""

    paths: tuple[Path, ...]
    batch_size: int

    @torch.no_grad()
    def __call__(self, model: CIRModel, *, device: torch.device, progress: bool) -> ValResult:
        model.eval()
        losses, sizes = [], []
        for chunk in in_chunks(list(self.paths), self.batch_size, desc="held-out images", progress=progress):
            losses.append(float(model.inversion_losses(_pixels(model, chunk).to(device))["inversion"]))
            sizes.append(len(chunk))
        loss = float(np.average(losses, weights=sizes))
        return ValResult({"inversion_loss": loss}, -loss, {})


@torch.no_grad()
def text_to_image_recall(
    model: CIRModel, paths: Sequence[Path], captions: Sequence[str], *, device: torch.device | str = "cpu",
    batch_size: int = 128, progress: bool = False,
) -> dict[str, float]:
    """R@k (%) of text -> image search among ``paths``: caption i hits where an image whose caption is the same
    text (image i, or a duplicate) ranks in the top k."""
    model.eval()
    images = torch.cat([model.encode_image(_pixels(model, chunk).to(device))[0].float().cpu()
                        for chunk in in_chunks(list(paths), batch_size, desc="held-out images", progress=progress)])
    texts = torch.cat([model.encode_text(model.tokenizer(list(chunk)).to(device))[0].float().cpu()
                       for chunk in in_chunks(list(captions), batch_size, desc="held-out captions", progress=progress)])
    _, label = np.unique(np.asarray(captions, dtype=object), return_inverse=True)  # equal texts, equal labels
    ranks = []
    for start in range(0, len(captions), batch_size):  # (chunk, N) at a time: a large --val-csv fits in memory
        scores = (texts[start : start + batch_size] @ images.T).numpy()
        correct = label[start : start + batch_size, None] == label[None, :]  # images described by the same text
        best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
        ranks.append((scores > best).sum(axis=1))  # images ranked above the best correct one
    rank = np.concatenate(ranks)
    return {f"R@{k}": float(100.0 * np.mean(rank < k)) for k in RECALL_AT}


def _pixels(model: CIRModel, paths: Sequence[Path]) -> torch.Tensor:
    transform = eval_transform(model.preprocess)
    return torch.stack([transform(load_image(path)) for path in paths])
