"""compir's synthetic benchmark (CSS-like): queries, splits and held-out combinations.

Public API (torch-free):

- :class:`SynthConfig`: sizes, image size, the held-out (shape, colour) pairs, siblings per reference
- :class:`SynthQuery`: (reference scene, modification text, target scene, kind, unseen)
- :func:`sample_train_query` ``(rng, *, config=SynthConfig()) -> SynthQuery``: a fresh TRAIN query
  for on-the-fly training; it never yields a held-out combination (in the reference or the target)
- :func:`sample_train_batch` ``(rng, *, batch_size, config=SynthConfig()) -> TrainBatch``: rendered
  pixels (B, S, S, 3) uint8 of references and targets, the texts, and the target names (equal
  names = identical scenes, to mask in-batch false negatives)
- :func:`plan_split` ``(rng, *, n_queries, split, config, taken) -> SplitPlan``: the queries of one
  split, grouped by reference so every reference has siblings (its other edits' targets)
- the scene model, :func:`~compir.data.synth_scene.render_scene` and
  :func:`~compir.data.synth_scene.scene_caption` come from :mod:`compir.data.synth_scene`

Hardness (like CSS): each val / test reference gets ``edits_per_reference`` distinct single edits
whose targets all enter the gallery, so ranking by the reference image alone finds one of the
siblings, the right one about once in ``edits_per_reference``. Generalisation: the held-out
(shape, colour) pairs never appear in a training scene; in val / test, a share of the add and
change edits create one of them (``unseen=True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from compir.data.synth_edits import KINDS, Modification, sample_modification
from compir.data.synth_scene import Scene, render_scene_array, sample_scene

DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "cyan"),
    ("square", "yellow"),
)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic dataset besides the seed (stored in dataset.json)."""

    n_train: int = 40_000
    n_val: int = 2_000
    n_test: int = 4_000
    image_size: int = 64
    max_objects: int = 5
    edits_per_reference: int = 8  # val / test: the reference's target + 7 siblings in the gallery
    train_edits_per_reference: int = 4
    unseen_fraction: float = 0.5  # share of val / test add + change edits that create a held-out pair
    held_out: tuple[tuple[str, str], ...] = field(default=DEFAULT_HELD_OUT)

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size < 12:
            raise ValueError(f"image_size must be >= 12 pixels (4 per grid cell), got {self.image_size}")
        if not 1 <= self.max_objects <= 9:
            raise ValueError(f"max_objects must be in 1..9, got {self.max_objects}")
        if self.edits_per_reference < 2 or self.train_edits_per_reference < 1:
            raise ValueError("edits_per_reference must be >= 2 and train_edits_per_reference >= 1")
        if not 0.0 <= self.unseen_fraction <= 1.0:
            raise ValueError(f"unseen_fraction must be in [0, 1], got {self.unseen_fraction}")

    def n_queries(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["held_out"] = [list(pair) for pair in self.held_out]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SynthConfig:
        values = dict(record)
        values["held_out"] = tuple(tuple(pair) for pair in values.get("held_out", DEFAULT_HELD_OUT))
        return cls(**values)


@dataclass(frozen=True)
class SynthQuery:
    """One composed query: the reference scene, the text, the target scene, kind and unseen flag."""

    reference: Scene
    text: str
    target: Scene
    kind: str
    unseen: bool = False
    attribute: str = ""


@dataclass(frozen=True)
class SplitPlan:
    """One split: its queries (grouped by reference) and, per reference, all its edits' targets."""

    split: str
    queries: tuple[SynthQuery, ...]
    siblings: dict[str, tuple[str, ...]]  # reference key -> target keys of all its edits

    def gallery(self) -> list[str]:
        """Every reference and target of the split, once, in a deterministic order."""
        names: dict[str, None] = {}
        for reference, targets in self.siblings.items():
            names[reference] = None
            names.update(dict.fromkeys(targets))
        return list(names)

    def scenes(self) -> dict[str, Scene]:
        found: dict[str, Scene] = {}
        for query in self.queries:
            found[query.reference.key] = query.reference
            found[query.target.key] = query.target
        return found


def _to_query(reference: Scene, edit: Modification, held_out: Sequence[tuple[str, str]]) -> SynthQuery:
    unseen = bool(edit.target.pairs() & set(held_out))
    return SynthQuery(reference, edit.text, edit.target, edit.kind, unseen, edit.attribute)


def sample_edits(
    reference: Scene,
    rng: np.random.Generator,
    *,
    count: int,
    config: SynthConfig,
    allow_unseen: bool,
) -> list[SynthQuery]:
    """Up to ``count`` edits of ``reference`` with distinct targets, kinds taken in turn."""
    queries: list[SynthQuery] = []
    targets = {reference.key}
    kinds = [KINDS[int(i)] for i in rng.permutation(len(KINDS))]
    for attempt in range(count * 12):
        if len(queries) == count:
            break
        kind = kinds[attempt % len(kinds)]
        unseen = allow_unseen and kind in ("add", "change") and rng.random() < config.unseen_fraction
        edit = sample_modification(
            reference,
            rng,
            kind=kind,
            excluded_pairs=config.held_out,
            unseen_pairs=config.held_out if unseen else None,
            max_objects=config.max_objects,
        )
        if edit is None or edit.target.key in targets:
            continue
        targets.add(edit.target.key)
        queries.append(_to_query(reference, edit, config.held_out))
    return queries


def sample_train_query(rng: np.random.Generator, *, config: SynthConfig = SynthConfig()) -> SynthQuery:
    """A fresh training query; neither scene holds a held-out (shape, colour) pair."""
    while True:
        reference = sample_scene(rng, max_objects=config.max_objects, excluded_pairs=config.held_out)
        edits = sample_edits(reference, rng, count=1, config=config, allow_unseen=False)
        if edits:
            return edits[0]


@dataclass(frozen=True)
class TrainBatch:
    """A batch of fresh training queries, rendered in memory."""

    reference_pixels: np.ndarray  # (B, S, S, 3) uint8
    texts: tuple[str, ...]
    target_pixels: np.ndarray  # (B, S, S, 3) uint8
    target_names: tuple[str, ...]  # scene keys: equal keys are the same image
    kinds: tuple[str, ...]


def sample_train_batch(rng: np.random.Generator, *, batch_size: int, config: SynthConfig = SynthConfig()) -> TrainBatch:
    """``batch_size`` fresh training queries (never a held-out pair), rendered at ``config.image_size``."""
    queries = [sample_train_query(rng, config=config) for _ in range(batch_size)]
    size = config.image_size
    return TrainBatch(
        reference_pixels=np.stack([render_scene_array(q.reference, size=size) for q in queries]),
        texts=tuple(q.text for q in queries),
        target_pixels=np.stack([render_scene_array(q.target, size=size) for q in queries]),
        target_names=tuple(q.target.key for q in queries),
        kinds=tuple(q.kind for q in queries),
    )


def plan_split(
    rng: np.random.Generator,
    *,
    n_queries: int,
    split: str,
    config: SynthConfig,
    taken: set[str],
) -> SplitPlan:
    """Sample ``n_queries`` queries of ``split``; references never reuse a key in ``taken`` (updated).

    val / test references get ``edits_per_reference`` edits each (all targets enter the gallery,
    queries are emitted until ``n_queries``); train references get ``train_edits_per_reference``.
    """
    evaluation = split != "train"
    per_reference = config.edits_per_reference if evaluation else config.train_edits_per_reference
    queries: list[SynthQuery] = []
    siblings: dict[str, tuple[str, ...]] = {}
    while len(queries) < n_queries:
        reference = sample_scene(rng, max_objects=config.max_objects, excluded_pairs=config.held_out)
        if reference.key in taken:
            continue
        edits = sample_edits(reference, rng, count=per_reference, config=config, allow_unseen=evaluation)
        if evaluation and len(edits) < per_reference:
            continue  # every evaluation reference has its full set of siblings
        if not edits:
            continue
        taken.add(reference.key)
        siblings[reference.key] = tuple(edit.target.key for edit in edits)
        queries.extend(edits[: n_queries - len(queries)])
    return SplitPlan(split, tuple(queries), siblings)


def plan_dataset(*, seed: int, config: SynthConfig) -> dict[str, SplitPlan]:
    """All three splits, deterministic in ``seed``; references are disjoint across splits."""
    taken: set[str] = set()
    plans = {}
    # test first, so the evaluation splits do not depend on the size of the training split
    for split in ("test", "val", "train"):
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        plans[split] = plan_split(rng, n_queries=config.n_queries(split), split=split, config=config, taken=taken)
    return {split: plans[split] for split in SPLITS}
