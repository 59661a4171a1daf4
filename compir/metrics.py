"""Composed retrieval metrics, one protocol per dataset (``CirSplit.protocol``), numpy only.

Ranking is by cosine similarity of L2-normalised embeddings (a dot product).

Ties are counted **pessimistically**: a gallery item that scores exactly as high as the best
target is ranked ahead of it, whatever the gallery order (so a model that maps everything to one
vector scores 0, not 100). Top-k lists (:func:`top_k`, the CIRR submission) break ties by
gallery order (a stable sort).

Protocols:

- ``cirr``: R@1/5/10/50 over the whole gallery with the query's reference removed from its own
  ranking (CIRR's rule; a reference that is also a target stays), and Recall_subset@1/2/3
  ranking only ``img_set.members`` minus the reference; ``Avg`` = (R@5 + Rs@1) / 2.
- ``synthetic``: CIRR's rules, plus the same metrics per ``seen`` / ``unseen`` and per
  ``kind=<kind>`` in the breakdown.
- ``fashioniq``: R@10 / R@50 per category against the whole split *of that category*, the
  reference NOT removed (CLIP4Cir's FashionIQ evaluation);
  ``R@10`` / ``R@50`` are the mean over categories, ``Avg`` their mean. Gallery names are
  category-qualified (``dress/B00...``, see :mod:`compir.data.fashioniq`) and ``Query.group`` is
  the category.
- ``fashioniq-val-queries``: TG-CIR's FashionIQ evaluation, the same recalls against a gallery of
  the split's query images only (each category's candidates and targets,
  :func:`compir.data.fashioniq.val_query_gallery`), the reference removed from its own ranking.
- ``shoes``: R@1/10/50 over the whole test gallery, the reference not removed (as FashionIQ).

This module sits below :mod:`compir.data` (whose readers and baselines call it): it reads splits
through the :class:`EvalQuery` / :class:`EvalSplit` protocols, which ``compir.data.types``'s
``Query`` and ``CirSplit`` satisfy, and imports nothing from the data package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from compir.errors import DatasetError, InputError

CIRR_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
SHOES_KS = (1, 10, 50)
_CHUNK = 512  # queries scored at once: (512, G) float32


class EvalQuery(Protocol):
    """What the metrics read of a query (``compir.data.types.Query`` has these fields)."""

    @property
    def query_id(self) -> str: ...
    @property
    def reference(self) -> str: ...
    @property
    def targets(self) -> tuple[str, ...]: ...
    @property
    def subset(self) -> tuple[str, ...]: ...
    @property
    def kind(self) -> str: ...
    @property
    def unseen(self) -> bool | None: ...
    @property
    def group(self) -> str: ...


class EvalSplit(Protocol):
    """What the metrics read of a split (``compir.data.types.CirSplit`` has these fields)."""

    @property
    def name(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def queries(self) -> Sequence[EvalQuery]: ...


@dataclass(frozen=True)
class EvalReport:
    """Metrics in percent (``"R@1"``, ``"Rs@1"``, ``"Avg"``), overall and per breakdown group."""

    protocol: str
    metrics: dict[str, float]
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    n_queries: int = 0
    group_sizes: dict[str, int] = field(default_factory=dict)

    def format_table(self) -> str:
        """A markdown table: one row overall, one per breakdown group."""
        columns = list(self.metrics)
        lines = [
            "| split | n | " + " | ".join(columns) + " |",
            "|---|---:|" + "---:|" * len(columns),
            f"| all | {self.n_queries} | " + " | ".join(f"{self.metrics[c]:.2f}" for c in columns) + " |",
        ]
        for group, values in self.breakdown.items():
            cells = " | ".join(f"{values[c]:.2f}" if c in values else "" for c in columns)
            lines.append(f"| {group} | {self.group_sizes.get(group, '')} | {cells} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "n_queries": self.n_queries,
            "metrics": dict(self.metrics),
            "breakdown": {group: dict(values) for group, values in self.breakdown.items()},
            "group_sizes": dict(self.group_sizes),
        }


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest ``scores`` (1-D), ties broken by position (stable)."""
    return np.argsort(-scores, kind="stable")[:k]


def _check_inputs(split: EvalSplit, query_embeds: np.ndarray, gallery_embeds: np.ndarray, gallery_names: Sequence[str]) -> dict[str, int]:
    if query_embeds.ndim != 2 or gallery_embeds.ndim != 2:
        raise InputError(f"embeddings must be 2-D (Q, D) and (G, D); got {query_embeds.shape} and {gallery_embeds.shape}")
    if query_embeds.shape[0] != len(split.queries):
        raise InputError(f"{query_embeds.shape[0]} query embeddings for {len(split.queries)} queries of split {split.name!r}")
    if gallery_embeds.shape[0] != len(gallery_names) or query_embeds.shape[1] != gallery_embeds.shape[1]:
        raise InputError(
            f"gallery embeddings {gallery_embeds.shape} do not match {len(gallery_names)} names "
            f"or the query dimension {query_embeds.shape[1]}"
        )
    if not (np.isfinite(query_embeds).all() and np.isfinite(gallery_embeds).all()):
        raise InputError("embeddings contain NaN or infinite values")
    index = {name: i for i, name in enumerate(gallery_names)}
    if len(index) != len(gallery_names):
        raise InputError("gallery_names contains duplicates; each gallery image must appear once")
    unlabeled = sum(not query.targets for query in split.queries)
    if unlabeled:
        raise DatasetError(
            f"split {split.name!r} has {unlabeled} queries without targets (hidden labels); "
            "write a submission with compir.data.submission instead"
        )
    return index


def _columns(names: Sequence[str], index: dict[str, int], *, what: str) -> list[int]:
    missing = [name for name in names if name not in index]
    if missing:
        raise InputError(f"{what} {missing[0]!r} is not in gallery_names ({len(missing)} missing); encode the split's whole gallery")
    return [index[name] for name in names]


def target_ranks(
    queries: Sequence[EvalQuery],
    query_embeds: np.ndarray,
    gallery_embeds: np.ndarray,
    index: dict[str, int],
    *,
    remove_reference: bool,
) -> np.ndarray:
    """1-based rank of each query's best target, ties pessimistic. (Q,) int64."""
    ranks = np.empty(len(queries), dtype=np.int64)
    gallery_t = np.ascontiguousarray(gallery_embeds.astype(np.float32).T)  # (D, G)
    for start in range(0, len(queries), _CHUNK):
        chunk = queries[start : start + _CHUNK]
        scores = query_embeds[start : start + len(chunk)].astype(np.float32) @ gallery_t  # (B, G)
        for row, query in enumerate(chunk):
            targets = _columns(query.targets, index, what="target")
            best = scores[row, targets].max()
            scores[row, targets] = -np.inf  # the other targets are not competitors
            if remove_reference and query.reference in index and query.reference not in query.targets:
                scores[row, index[query.reference]] = -np.inf
            ranks[start + row] = 1 + int(np.count_nonzero(scores[row] >= best))
    return ranks


def subset_ranks(queries: Sequence[EvalQuery], query_embeds: np.ndarray, gallery_embeds: np.ndarray, index: dict[str, int]) -> np.ndarray:
    """1-based rank of the target among ``subset`` minus the reference (CIRR Recall_subset)."""
    ranks = np.empty(len(queries), dtype=np.int64)
    for row, query in enumerate(queries):
        members = [m for m in dict.fromkeys(query.subset) if m != query.reference]
        columns = _columns(members, index, what="img_set member")
        scores = gallery_embeds[columns].astype(np.float32) @ query_embeds[row].astype(np.float32)  # (M,)
        is_target = np.array([m in query.targets for m in members])
        if not is_target.any():
            raise DatasetError(f"query {query.query_id}: no target among its img_set members")
        best = scores[is_target].max()
        ranks[row] = 1 + int(np.count_nonzero(scores[~is_target] >= best))
    return ranks


def _recalls(ranks: np.ndarray, ks: Sequence[int], prefix: str = "R") -> dict[str, float]:
    return {f"{prefix}@{k}": float(100.0 * np.mean(ranks <= k)) if len(ranks) else 0.0 for k in ks}


def evaluate_split(
    split: EvalSplit,
    *,
    query_embeds: np.ndarray,
    gallery_embeds: np.ndarray,
    gallery_names: Sequence[str],
) -> EvalReport:
    """Evaluate ranked retrieval on ``split`` by its protocol (see the module docstring).

    ``query_embeds[i]`` (Q, D) belongs to ``split.queries[i]``; ``gallery_embeds`` (G, D) to
    ``gallery_names``; both L2-normalised. Image-only or text-only baselines are the same call
    with other query embeddings. Raises InputError on mismatched inputs, DatasetError on a split
    without labels.
    """
    index = _check_inputs(split, query_embeds, gallery_embeds, gallery_names)
    if split.protocol in ("cirr", "synthetic"):
        return _evaluate_cirr(split, query_embeds, gallery_embeds, index)
    if split.protocol in ("fashioniq", "fashioniq-val-queries"):
        return _evaluate_fashioniq(split, query_embeds, gallery_embeds, gallery_names)
    if split.protocol == "shoes":
        ranks = target_ranks(split.queries, query_embeds, gallery_embeds, index, remove_reference=False)
        return EvalReport("shoes", _recalls(ranks, SHOES_KS), n_queries=len(ranks))
    raise DatasetError(f"split {split.name!r} has unknown protocol {split.protocol!r}")


def _evaluate_cirr(split: EvalSplit, query_embeds: np.ndarray, gallery_embeds: np.ndarray, index: dict[str, int]) -> EvalReport:
    ranks = target_ranks(split.queries, query_embeds, gallery_embeds, index, remove_reference=True)
    has_subset = all(query.subset for query in split.queries)
    sranks = subset_ranks(split.queries, query_embeds, gallery_embeds, index) if has_subset else None

    def summary(mask: np.ndarray) -> dict[str, float]:
        values = _recalls(ranks[mask], CIRR_KS)
        if sranks is not None:
            values |= _recalls(sranks[mask], SUBSET_KS, prefix="Rs")
            values["Avg"] = (values["R@5"] + values["Rs@1"]) / 2
        return values

    everything = np.ones(len(ranks), dtype=bool)
    breakdown: dict[str, dict[str, float]] = {}
    sizes: dict[str, int] = {}
    if split.protocol == "synthetic":
        groups = {
            "seen": np.array([q.unseen is False for q in split.queries]),
            "unseen": np.array([q.unseen is True for q in split.queries]),
        }
        for kind in sorted({q.kind for q in split.queries if q.kind}):
            groups[f"kind={kind}"] = np.array([q.kind == kind for q in split.queries])
        for group, mask in groups.items():
            if mask.any():
                breakdown[group], sizes[group] = summary(mask), int(mask.sum())
    return EvalReport(split.protocol, summary(everything), breakdown, len(ranks), sizes)


def _evaluate_fashioniq(split: EvalSplit, query_embeds: np.ndarray, gallery_embeds: np.ndarray, gallery_names: Sequence[str]) -> EvalReport:
    breakdown: dict[str, dict[str, float]] = {}
    sizes: dict[str, int] = {}
    categories = [_category_of(name) for name in gallery_names]
    for group in dict.fromkeys(q.group for q in split.queries):
        rows = [i for i, q in enumerate(split.queries) if q.group == group]
        columns = [i for i, category in enumerate(categories) if category == group]
        index = {gallery_names[c]: j for j, c in enumerate(columns)}  # the category's own gallery
        queries = [split.queries[i] for i in rows]
        remove_reference = split.protocol == "fashioniq-val-queries"  # TG-CIR's rule; CLIP4Cir keeps it
        ranks = target_ranks(queries, query_embeds[rows], gallery_embeds[columns], index, remove_reference=remove_reference)
        breakdown[group], sizes[group] = _recalls(ranks, FASHIONIQ_KS), len(rows)
    metrics = {f"R@{k}": float(np.mean([values[f"R@{k}"] for values in breakdown.values()])) for k in FASHIONIQ_KS}
    metrics["Avg"] = (metrics["R@10"] + metrics["R@50"]) / 2
    return EvalReport(split.protocol, metrics, breakdown, len(split.queries), sizes)


def _category_of(name: str) -> str:
    """The category of a qualified FashionIQ gallery name (``"dress/B00..." -> "dress"``)."""
    category, sep, _ = name.partition("/")
    if not sep or not category:
        raise DatasetError(f"{name!r} is not a category-qualified FashionIQ name like 'dress/B00006M009'")
    return category
