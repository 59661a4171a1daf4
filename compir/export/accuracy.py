"""The retrieval cost of each export variant, measured on an evaluation split at export time.

Every variant encodes the same gallery (image_encoder -> image_embeds) and the same composed
queries (query_encoder on reference pixels + token ids -> query_embeds) with onnxruntime; recall
comes from :func:`compir.metrics.evaluate_split`, and each variant is compared to fp32 both by its
recall drop (in points) and by the mean cosine of its embeddings to fp32's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from compir.data.types import CirSplit
from compir.export.parity import mean_cosine, open_session, run_session
from compir.export.samples import pixels, token_ids
from compir.manifest import IMAGE_ENCODER, QUERY_ENCODER, PreprocessSpec
from compir.metrics import EvalReport, evaluate_split


@dataclass(frozen=True)
class SplitEncoding:
    query_embeds: np.ndarray  # (Q, D)
    gallery_embeds: np.ndarray  # (G, D)
    gallery_names: list[str]


def encode_split(
    variants: Mapping[str, Mapping[str, Path]],
    *,
    split: CirSplit,
    preprocess: PreprocessSpec,
    context_length: int,
    batch_size: int = 64,
    threads: int = 0,
) -> dict[str, SplitEncoding]:
    """Gallery and composed-query embeddings of ``split`` through each variant's ONNX graphs.

    Each chunk of images is decoded and preprocessed once and fed to every variant.
    """
    image = {name: open_session(graphs[IMAGE_ENCODER], threads=threads) for name, graphs in variants.items()}
    query = {name: open_session(graphs[QUERY_ENCODER], threads=threads) for name, graphs in variants.items()}
    names = list(split.gallery)
    gallery: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    queries: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    steps = range(0, max(len(names), len(split.queries)), batch_size)
    for start in tqdm(steps, desc=f"encode {split.name} ({len(variants)} variants)", unit="batch"):
        chunk = [split.image_path(n) for n in names[start : start + batch_size]]
        if chunk:
            feeds = {"pixel_values": pixels(chunk, preprocess=preprocess)}
            for name, session in image.items():
                gallery[name].append(run_session(session, feeds)["image_embeds"])
        chunk_q = split.queries[start : start + batch_size]
        if chunk_q:
            feeds = {
                "pixel_values": pixels([split.image_path(q.reference) for q in chunk_q], preprocess=preprocess),
                "input_ids": token_ids([q.text for q in chunk_q], context_length=context_length),
            }
            for name, session in query.items():
                queries[name].append(run_session(session, feeds)["query_embeds"])
    return {name: SplitEncoding(np.concatenate(queries[name]), np.concatenate(gallery[name]), names) for name in variants}


def measure_accuracy(
    variants: Mapping[str, Mapping[str, Path]],
    *,
    split: CirSplit,
    preprocess: PreprocessSpec,
    context_length: int,
    reference: str = "fp32",
) -> dict[str, dict[str, float]]:
    """Per variant: its recall metrics, their drop against ``reference`` and cosines to it."""
    encodings = encode_split(variants, split=split, preprocess=preprocess, context_length=context_length)
    reports: dict[str, EvalReport] = {
        name: evaluate_split(split, query_embeds=enc.query_embeds, gallery_embeds=enc.gallery_embeds, gallery_names=enc.gallery_names)
        for name, enc in encodings.items()
    }
    base = encodings.get(reference)
    results: dict[str, dict[str, float]] = {}
    for name, report in reports.items():
        figures = {key: float(value) for key, value in report.metrics.items()}
        if base is not None:
            base_metrics = reports[reference].metrics
            for key, value in report.metrics.items():
                figures[f"{key}_drop"] = float(base_metrics[key] - value)
            if "R@10" in report.metrics:
                figures["recall_at_10_drop"] = figures["R@10_drop"]
            figures["mean_cosine_to_fp32"] = mean_cosine(encodings[name].query_embeds, base.query_embeds)
            figures["gallery_cosine_to_fp32"] = mean_cosine(encodings[name].gallery_embeds, base.gallery_embeds)
        figures["n_queries"] = float(report.n_queries)
        results[name] = figures
    return results
