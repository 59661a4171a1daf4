"""Training batches: fresh synthetic scenes every epoch, or a real dataset's files on disk.

Both yield :class:`TrainBatch` (row i of every tensor belongs to triplet i). The synthetic source
never replays a scene set (a fixed set gets memorised): each epoch samples new references from
the DATA stage's generator and puts ``siblings`` edits of one reference next to each other, so
the other edits' targets are in-batch hard negatives. Held-out (unseen) combinations are never
sampled (``compir.data.synth.sample_edits`` with ``allow_unseen=False``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from compir.data.synth import SynthConfig, SynthQuery, sample_edits
from compir.data.synth_scene import Scene, render_scene_array, sample_scene, scene_caption
from compir.data.types import CirSplit
from compir.errors import DatasetError, InputError
from compir.images import load_image
from compir.manifest import PreprocessSpec
from compir.train.text import TextTokenizer
from compir.train.transforms import eval_transform, pixels_to_tensor, train_transform


@dataclass(frozen=True)
class TrainBatch:
    reference_pixels: torch.Tensor  # (R, 3, S, S) distinct references
    input_ids: torch.Tensor  # (B, L) modification texts
    target_pixels: torch.Tensor  # (B, 3, S, S)
    caption_ids: torch.Tensor | None  # (B, L) descriptions of the targets, where the data has them
    reference_index: torch.Tensor | None = None  # (B,) row of each triplet's reference; None = R is B

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(
            self.reference_pixels.to(device),
            self.input_ids.to(device),
            self.target_pixels.to(device),
            None if self.caption_ids is None else self.caption_ids.to(device),
            None if self.reference_index is None else self.reference_index.to(device),
        )

    def losses(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's (or its DDP wrapper's) loss terms of this batch."""
        terms: dict[str, torch.Tensor] = model(
            self.reference_pixels, self.input_ids, self.target_pixels, self.caption_ids, self.reference_index)
        return terms


class SyntheticSource:
    """Endless fresh synthetic triplets; an epoch is ``steps_per_epoch`` batches."""

    def __init__(
        self,
        synth: SynthConfig,
        *,
        preprocess: PreprocessSpec,
        tokenizer: TextTokenizer,
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        rank: int = 0,
        siblings: int | None = None,
    ) -> None:
        self.synth = synth
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.rank = rank
        self.siblings = max(1, siblings or synth.train_edits_per_reference)
        self._render_size = synth.image_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[TrainBatch]:
        # One stream per (seed, epoch, rank): resuming at an epoch or adding a process never
        # replays another stream's scenes.
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        for _ in range(self.steps_per_epoch):
            yield self._batch(self.sample_queries(rng))

    def sample_queries(self, rng: np.random.Generator) -> list[SynthQuery]:
        """``batch_size`` training queries, grouped by reference, with distinct targets."""
        queries: list[SynthQuery] = []
        targets: set[str] = set()
        while len(queries) < self.batch_size:
            reference = sample_scene(rng, max_objects=self.synth.max_objects, excluded_pairs=self.synth.held_out)
            for query in sample_edits(reference, rng, count=self.siblings, config=self.synth, allow_unseen=False):
                if query.target.key not in targets and len(queries) < self.batch_size:
                    targets.add(query.target.key)
                    queries.append(query)
        return queries

    def _batch(self, queries: list[SynthQuery]) -> TrainBatch:
        # Siblings share their reference: encode each distinct reference once.
        rows: dict[str, int] = {}
        references: list[Scene] = []
        for query in queries:
            if query.reference.key not in rows:
                rows[query.reference.key] = len(references)
                references.append(query.reference)
        return TrainBatch(
            reference_pixels=self._pixels(references),
            input_ids=self.tokenizer([q.text for q in queries]),
            target_pixels=self._pixels([q.target for q in queries]),
            caption_ids=self.tokenizer([scene_caption(q.target) for q in queries]),
            reference_index=torch.tensor([rows[q.reference.key] for q in queries], dtype=torch.long),
        )

    def _pixels(self, scenes: list[Scene]) -> torch.Tensor:
        return render_pixels(scenes, size=self._render_size, preprocess=self.preprocess)


def render_pixels(scenes: list[Scene], *, size: int, preprocess: PreprocessSpec) -> torch.Tensor:
    """(B, 3, S, S): the scenes rendered at ``size`` and preprocessed for the model."""
    images = [Image.fromarray(render_scene_array(scene, size=size)) for scene in scenes]
    if size == preprocess.image_size:
        return pixels_to_tensor(images, preprocess)
    resize = eval_transform(preprocess)
    return torch.stack([resize(image) for image in images])


class SplitDataset(torch.utils.data.Dataset):
    """A real dataset's training queries (first target of each), images decoded from disk."""

    def __init__(self, split: CirSplit, *, preprocess: PreprocessSpec, tokenizer: TextTokenizer, augment: bool = True) -> None:
        self.queries = [q for q in split.queries if q.targets]
        if not self.queries:
            raise DatasetError(f"split {split.name!r} under {split.root} has no labelled queries to train on")
        self.split = split
        self.tokenizer = tokenizer
        self.transform = train_transform(preprocess) if augment else eval_transform(preprocess)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        query = self.queries[index]
        target = query.targets[0]
        captions = self.split.captions.get(target, ())
        caption_ids = self.tokenizer([captions[0] if captions else ""])[0]
        return (
            self._image(query.reference),
            self.tokenizer([query.text])[0],
            self._image(target),
            caption_ids,
            bool(captions),
        )

    def _image(self, name: str) -> torch.Tensor:
        try:
            path: Path = self.split.image_path(name)
        except KeyError as exc:
            raise DatasetError(str(exc)) from exc
        return self.transform(load_image(path))


class SplitSource:
    """Batches of a real dataset through a DataLoader (sharded across DDP processes)."""

    def __init__(
        self,
        split: CirSplit,
        *,
        preprocess: PreprocessSpec,
        tokenizer: TextTokenizer,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 2,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.dataset = SplitDataset(split, preprocess=preprocess, tokenizer=tokenizer)
        if len(self.dataset) < batch_size * world_size:
            raise InputError(
                f"{len(self.dataset)} training queries are fewer than one batch ({batch_size} x {world_size} "
                f"processes); lower --batch-size"
            )
        self.sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
            self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers, drop_last=True,
            persistent_workers=workers > 0,
        )

        self.steps_per_epoch = min(len(self.loader), steps_per_epoch or len(self.loader))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[TrainBatch]:
        self.sampler.set_epoch(epoch)
        for reference, ids, target, caption_ids, has_caption in itertools.islice(self.loader, self.steps_per_epoch):
            # Captions only count where every target of the batch has one.
            yield TrainBatch(reference, ids, target, caption_ids if bool(has_caption.all()) else None)


def synthetic_steps_per_epoch(synth: SynthConfig, *, batch_size: int, world_size: int) -> int:
    """One epoch = as many fresh triplets as the dataset's train split holds."""
    return max(1, math.ceil(synth.n_train / (batch_size * world_size)))
