"""The retrieval cost of each export variant, measured on an evaluation split at export time.

Measured through the runtime, the path users run (:func:`compir.runtime.evaluation.encode_split`:
numpy preprocessing, the runtime's tokenizer, image encoder + text encoder + composer), for every
variant on the same decoded images; recall comes from :func:`compir.metrics.evaluate_split`, and
each variant is compared to fp32 both by its recall drop (in points) and by the mean cosine of its
embeddings to fp32's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from compir.data.types import CirSplit
from compir.export.parity import mean_cosine
from compir.metrics import EvalReport, evaluate_split


def measure_accuracy(
    export_dir: Path,
    *,
    variants: Sequence[str],
    split: CirSplit,
    reference: str = "fp32",
) -> dict[str, dict[str, float]]:
    """Per variant of the export folder: its recall metrics, their drop against ``reference`` and cosines to it."""
    from compir.manifest import load_manifest
    from compir.runtime.backends import open_backend
    from compir.runtime.encoder import Encoder
    from compir.runtime.evaluation import encode_split

    manifest = load_manifest(export_dir)  # checksums verified once for every variant
    encoders = {
        name: Encoder(export_dir, manifest, open_backend("onnxruntime", export_dir, providers=["cpu"], spinning=False), variant=name)
        for name in variants
    }
    encodings = encode_split(encoders, split)
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
