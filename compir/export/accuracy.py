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
from compir.manifest import IMAGE_ENCODER, QUERY_ENCODER, PreprocessSpec
from compir.metrics import EvalReport, evaluate_split
from compir.export.parity import mean_cosine, open_session, run_session
from compir.export.samples import pixels, token_ids


@dataclass(frozen=True)
class SplitEncoding:
    query_embeds: np.ndarray  # (Q, D)
    gallery_embeds: np.ndarray  # (G, D)
    gallery_names: list[str]


def encode_split(
    graphs: Mapping[str, Path],
    *,
    split: CirSplit,
    preprocess: PreprocessSpec,
    context_length: int,
    batch_size: int = 64,
    threads: int = 0,
) -> SplitEncoding:
    """Gallery and composed-query embeddings of ``split`` through one variant's ONNX graphs."""
    image_session = open_session(graphs[IMAGE_ENCODER], threads=threads)
    query_session = open_session(graphs[QUERY_ENCODER], threads=threads)
    names = list(split.gallery)
    gallery = []
    for start in range(0, len(names), batch_size):
        chunk = [split.image_path(n) for n in names[start : start + batch_size]]
        gallery.append(run_session(image_session, {"pixel_values": pixels(chunk, preprocess=preprocess)})["image_embeds"])
    queries = []
    for start in range(0, len(split.queries), batch_size):
        chunk_q = split.queries[start : start + batch_size]
        feeds = {
            "pixel_values": pixels([split.image_path(q.reference) for q in chunk_q], preprocess=preprocess),
            "input_ids": token_ids([q.text for q in chunk_q], context_length=context_length),
        }
        queries.append(run_session(query_session, feeds)["query_embeds"])
    return SplitEncoding(np.concatenate(queries), np.concatenate(gallery), names)


def measure_accuracy(
    variants: Mapping[str, Mapping[str, Path]],
    *,
    split: CirSplit,
    preprocess: PreprocessSpec,
    context_length: int,
    reference: str = "fp32",
) -> dict[str, dict[str, float]]:
    """Per variant: its recall metrics, their drop against ``reference`` and cosines to it."""
    encodings: dict[str, SplitEncoding] = {}
    reports: dict[str, EvalReport] = {}
    for name in tqdm(list(variants), desc="accuracy per variant", unit="variant"):
        encodings[name] = encode_split(variants[name], split=split, preprocess=preprocess, context_length=context_length)
        enc = encodings[name]
        reports[name] = evaluate_split(split, query_embeds=enc.query_embeds, gallery_embeds=enc.gallery_embeds, gallery_names=enc.gallery_names)
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
