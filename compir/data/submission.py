"""CIRR test-server submission files (the test1 labels are hidden).

Two JSON files, as the evaluation server expects::

    {"version": "rc2", "metric": "recall",        "<pairid>": [top-50 gallery names], ...}
    {"version": "rc2", "metric": "recall_subset", "<pairid>": [top-3 names of img_set.members], ...}

Rankings follow :mod:`compir.metrics`: cosine similarity, the reference removed from its own
ranking and from its subset, ties broken by gallery order (stable).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compir.contracts import atomic_write_bytes
from compir.data.types import CirSplit
from compir.errors import InputError
from compir.metrics import top_k

RECALL_TOP = 50
SUBSET_TOP = 3


@dataclass(frozen=True)
class Submission:
    """The two files written by :func:`write_cirr_submission`."""

    recall: Path
    recall_subset: Path


def cirr_rankings(
    split: CirSplit,
    *,
    query_embeds: np.ndarray,
    gallery_embeds: np.ndarray,
    gallery_names: Sequence[str],
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per pairid: the top-50 gallery names and the top-3 subset names (reference removed)."""
    if query_embeds.shape[0] != len(split.queries) or gallery_embeds.shape[0] != len(gallery_names):
        raise InputError(
            f"{query_embeds.shape[0]} query / {gallery_embeds.shape[0]} gallery embeddings for "
            f"{len(split.queries)} queries / {len(gallery_names)} gallery names"
        )
    index = {name: i for i, name in enumerate(gallery_names)}
    gallery = gallery_embeds.astype(np.float32)
    recall: dict[str, list[str]] = {}
    subset: dict[str, list[str]] = {}
    for row, query in enumerate(split.queries):
        scores = gallery @ query_embeds[row].astype(np.float32)  # (G,)
        if query.reference in index:
            scores[index[query.reference]] = -np.inf
        recall[query.query_id] = [gallery_names[i] for i in top_k(scores, RECALL_TOP) if np.isfinite(scores[i])]
        members = [m for m in dict.fromkeys(query.subset) if m != query.reference]
        unknown = [m for m in members if m not in index]
        if unknown:
            raise InputError(f"pairid {query.query_id}: img_set member {unknown[0]!r} is not in gallery_names")
        member_scores = np.array([scores[index[m]] for m in members], dtype=np.float32)
        subset[query.query_id] = [members[i] for i in top_k(member_scores, SUBSET_TOP)]
    return recall, subset


def write_cirr_submission(
    split: CirSplit,
    *,
    query_embeds: np.ndarray,
    gallery_embeds: np.ndarray,
    gallery_names: Sequence[str],
    out_dir: str | os.PathLike[str],
    name: str = "compir",
) -> Submission:
    """Write ``recall_submission_<name>.json`` and ``recall_subset_submission_<name>.json``."""
    recall, subset = cirr_rankings(split, query_embeds=query_embeds, gallery_embeds=gallery_embeds, gallery_names=gallery_names)
    folder = Path(out_dir)
    paths = Submission(folder / f"recall_submission_{name}.json", folder / f"recall_subset_submission_{name}.json")
    for path, metric, rankings in ((paths.recall, "recall", recall), (paths.recall_subset, "recall_subset", subset)):
        record: dict[str, Any] = {"version": "rc2", "metric": metric, **rankings}
        atomic_write_bytes(path, (json.dumps(record) + "\n").encode("utf-8"))
    return paths
