"""Training batches without triplets: image-caption pairs (``--objective clip``) and images alone (Pic2Word).

:class:`PairBatch` holds images and their captions; :class:`ImageBatch` holds pixels and nothing else, so a
textual-inversion head's training never sees a caption, a modification text or a target. Each comes from
files on disk (:class:`FileSource`: open_clip's CSV, a folder of photos, a dataset's training images) or
from fresh synthetic scenes (:class:`SceneSource`: training-distribution scenes, held-out pairs never drawn,
a new set every epoch; with their descriptions for pairs).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compir.data.synth import SynthConfig
from compir.data.synth_scene import Scene, sample_scene, scene_caption
from compir.errors import DatasetError, InputError
from compir.images import load_image
from compir.manifest import PreprocessSpec
from compir.train.sources import render_pixels
from compir.train.text import TextTokenizer
from compir.train.transforms import train_transform


@dataclass(frozen=True)
class PairBatch:
    """B image-caption pairs: CLIP's objective (row i's caption describes row i's image)."""

    pixel_values: torch.Tensor  # (B, 3, S, S)
    caption_ids: torch.Tensor  # (B, L)

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.pixel_values.to(device), self.caption_ids.to(device))

    def losses(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = model(self.pixel_values, caption_ids=self.caption_ids, objective="clip")
        return terms


@dataclass(frozen=True)
class ImageBatch:
    """B images and nothing else: a textual-inversion head's training batch."""

    pixel_values: torch.Tensor  # (B, 3, S, S)

    def to(self, device: torch.device) -> ImageBatch:
        return ImageBatch(self.pixel_values.to(device))

    def losses(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = model(self.pixel_values, objective="inversion")
        return terms


class _Files(torch.utils.data.Dataset):
    """Images from disk (with their token ids, for pairs); a decode failure names the file and ``where[i]``."""

    def __init__(self, paths: Sequence[Path], where: Sequence[str], *, preprocess: PreprocessSpec,
                 caption_ids: torch.Tensor | None) -> None:
        self.paths, self.where, self.caption_ids = list(paths), list(where), caption_ids
        self.transform = train_transform(preprocess)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        try:
            pixels = self.transform(load_image(self.paths[index]))
        except InputError as exc:
            raise DatasetError(f"{self.where[index]}: {exc}") from exc
        return pixels if self.caption_ids is None else (pixels, self.caption_ids[index])


class FileSource:
    """Batches of image files (a DataLoader, sharded across DDP processes): pairs where captions are given."""

    def __init__(
        self, paths: Sequence[Path], *, where: Sequence[str], captions: Sequence[str] | None, preprocess: PreprocessSpec,
        tokenizer: TextTokenizer, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, workers: int = 2,
        steps_per_epoch: int | None = None,
    ) -> None:
        if len(paths) < batch_size * world_size:
            raise InputError(f"{len(paths)} training images are fewer than one batch ({batch_size} x {world_size} processes); "
                             "lower --batch-size")
        ids = None if captions is None else tokenizer(list(captions))
        self.pairs = captions is not None
        dataset = _Files(paths, where, preprocess=preprocess, caption_ids=ids)
        self.sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                                  drop_last=True, persistent_workers=workers > 0)
        self.steps_per_epoch = min(len(self.loader), steps_per_epoch or len(self.loader))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[PairBatch | ImageBatch]:
        self.sampler.set_epoch(epoch)
        try:
            for item in itertools.islice(self.loader, self.steps_per_epoch):
                yield PairBatch(*item) if self.pairs else ImageBatch(item)
        except DatasetError as exc:  # from a loader process: its message is the traceback's last line
            raise DatasetError(str(exc).strip().splitlines()[-1].removeprefix("compir.errors.DatasetError: ")) from None


class SceneSource:
    """Fresh synthetic training scenes every epoch, distinct within a batch; with their descriptions for pairs."""

    def __init__(
        self, synth: SynthConfig, *, preprocess: PreprocessSpec, tokenizer: TextTokenizer | None, batch_size: int,
        steps_per_epoch: int, seed: int, rank: int = 0,
    ) -> None:
        self.synth, self.preprocess, self.tokenizer = synth, preprocess, tokenizer
        self.batch_size, self.steps_per_epoch, self.seed, self.rank = batch_size, steps_per_epoch, seed, rank

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[PairBatch | ImageBatch]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])  # one stream per (seed, epoch, rank), as SyntheticSource
        for _ in range(self.steps_per_epoch):
            scenes = self.sample_scenes(rng)
            pixels = render_pixels(scenes, size=self.synth.image_size, preprocess=self.preprocess)
            if self.tokenizer is None:
                yield ImageBatch(pixels)
            else:
                yield PairBatch(pixels, self.tokenizer([scene_caption(scene) for scene in scenes]))

    def sample_scenes(self, rng: np.random.Generator) -> list[Scene]:
        """``batch_size`` distinct training scenes (an identical pair would be a false negative)."""
        scenes: dict[str, Scene] = {}
        while len(scenes) < self.batch_size:
            scene = sample_scene(rng, max_objects=self.synth.max_objects, excluded_pairs=self.synth.held_out)
            scenes.setdefault(scene.key, scene)
        return list(scenes.values())
