"""Evaluate a CIRModel on a split: composed queries, plus three training-free baselines.

All use the same protocol (:func:`compir.metrics.evaluate_split`) and the same gallery; only the
query vectors differ: the composed query, the reference's own gallery vector (image-only), the
modification text's vector (text-only), or the normalised sum of those two (``sum``). A zero-shot
(textual-inversion) head composes through the text tower: the query is the prompt ``template``
filled with the modification, read with the reference's pseudo token (Pic2Word's CIRR protocol).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

from compir.data.types import CirSplit
from compir.metrics import EvalReport, evaluate_split
from compir.prompts import DEFAULT_TEMPLATE, PromptTemplate
from compir.train.model import CIRModel
from compir.train.transforms import eval_transform, split_pixels

QUERY_MODES = ("composed", "image_only", "text_only")
SUM_MODE = "sum"  # the normalised sum of the image-only and text-only vectors (a training-free baseline)
T = TypeVar("T")


@dataclass(frozen=True)
class SplitEmbeddings:
    """Rows of the three query matrices follow ``split.queries``; all rows L2-normalised."""

    queries: dict[str, np.ndarray]  # mode -> (Q, D)
    gallery_embeds: np.ndarray  # (G, D)
    gallery_names: list[str]


@torch.no_grad()
def encode_split(
    model: CIRModel,
    split: CirSplit,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = True,
    template: str = DEFAULT_TEMPLATE,
) -> SplitEmbeddings:
    """Encode every gallery and reference image once, every query text once, then compose (``template``: the
    prompt of a zero-shot head)."""
    model.eval()
    prompt = PromptTemplate(template)
    device = torch.device(device)
    transform = eval_transform(model.preprocess)
    names = sorted(set(split.gallery) | {q.reference for q in split.queries})
    embeds: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    for chunk in in_chunks(names, batch_size, desc="encoding images", progress=progress):
        pixels = split_pixels(split, chunk, transform)
        image_embeds, image_features, _ = model.encode_image(pixels.to(device))
        embeds.append(image_embeds.float().cpu())
        features.append(image_features.float().cpu())
    image_embeds_all, image_features_all = torch.cat(embeds), torch.cat(features)
    row = {name: i for i, name in enumerate(names)}

    composed, text_only = [], []
    for chunk_q in in_chunks(list(split.queries), batch_size, desc="encoding queries", progress=progress):
        ids = model.tokenizer([q.text for q in chunk_q]).to(device)
        text_embeds, text_features, _ = model.encode_text(ids)
        references = image_features_all[[row[q.reference] for q in chunk_q]].to(device)
        if model.head.textual_inversion:  # zero-shot: the filled prompt, read with each reference's pseudo token
            prompt_ids = model.tokenizer([prompt.fill(q.text) for q in chunk_q]).to(device)
            composed.append(model.encode_prompt(prompt_ids, model.map_image(references)).float().cpu())
        else:
            composed.append(model.compose(references, text_features).float().cpu())
        text_only.append(text_embeds.float().cpu())
    reference_rows = [row[q.reference] for q in split.queries]
    image_only, text_only_all = image_embeds_all[reference_rows], torch.cat(text_only)
    return SplitEmbeddings(
        queries={
            "composed": torch.cat(composed).numpy(),
            "image_only": image_only.numpy(),
            "text_only": text_only_all.numpy(),
            SUM_MODE: torch.nn.functional.normalize(image_only + text_only_all, dim=-1).numpy(),
        },
        gallery_embeds=image_embeds_all[[row[name] for name in split.gallery]].numpy(),
        gallery_names=list(split.gallery),
    )


def evaluate_model(
    model: CIRModel,
    split: CirSplit,
    *,
    modes: Sequence[str] = QUERY_MODES,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = True,
    template: str = DEFAULT_TEMPLATE,
) -> dict[str, EvalReport]:
    """The split's protocol metrics for each query mode (``composed`` first)."""
    encoded = encode_split(model, split, batch_size=batch_size, device=device, progress=progress, template=template)
    return reports_for(split, encoded, modes=modes)


def reports_for(split: CirSplit, encoded: SplitEmbeddings, *, modes: Sequence[str] = QUERY_MODES) -> dict[str, EvalReport]:
    return {
        mode: evaluate_split(
            split,
            query_embeds=encoded.queries[mode],
            gallery_embeds=encoded.gallery_embeds,
            gallery_names=encoded.gallery_names,
        )
        for mode in modes
    }


def query_modes(model: CIRModel, *, baselines: bool = True, sum_baseline: bool = False) -> tuple[str, ...]:
    """The query modes to report: composed, then the image-only and text-only baselines, plus the sum baseline
    where asked and always for a zero-shot head (the baselines a user without triplets would try first)."""
    if not baselines:
        return ("composed",)
    return QUERY_MODES + ((SUM_MODE,) if sum_baseline or model.head.textual_inversion else ())


def selection_score(report: EvalReport) -> float:
    """One number to pick the best checkpoint: the protocol's ``Avg`` if it has one, else the
    mean of its recalls."""
    if "Avg" in report.metrics:
        return float(report.metrics["Avg"])
    return float(np.mean(list(report.metrics.values()))) if report.metrics else 0.0


def in_chunks(items: list[T], size: int, *, desc: str, progress: bool) -> Iterable[list[T]]:
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    return tqdm(chunks, desc=desc, unit="batch", disable=not progress, leave=False)
