"""Real inputs for parity checks and int8 calibration: gallery images and modification texts.

From a dataset folder (any layout :func:`compir.data.load.load_split` reads: its gallery images
and its queries' texts), from a plain folder of images (with built-in texts), or, with no data at
hand, rendered synthetic scenes and their edit texts. Never random noise: quantization scales and
parity figures are only meaningful on the distribution the model will see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compir.data.types import CirSplit
from compir.errors import CompirError, ContractError
from compir.images import ImageSource, load_image
from compir.manifest import PreprocessSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_SPLITS = ("val", "test", "train", "test1", "dev")
# For plain image folders: edits of the kinds the benchmarks ask for.
_FALLBACK_TEXTS = (
    "make it red",
    "remove the small blue circle",
    "add a large green square at the top left",
    "is darker and has long sleeves",
    "change the triangle to yellow",
    "move the circle to the bottom right",
    "same shoe but in black leather",
    "show it from the side with a white background",
)


@dataclass(frozen=True)
class Samples:
    """N preprocessed images and N tokenized texts (paired by position only for batching)."""

    pixel_values: np.ndarray  # (N, 3, S, S) float32
    input_ids: np.ndarray  # (N, L) int64
    image_names: tuple[str, ...]
    texts: tuple[str, ...]
    source: str  # where they came from, for the manifest and messages

    def __len__(self) -> int:
        return len(self.image_names)


def load_samples(
    *,
    preprocess: PreprocessSpec,
    tokenizer: Callable[[Sequence[str]], Any],
    data_dir: str | Path | None = None,
    count: int = 32,
    seed: int = 0,
) -> Samples:
    """``count`` images and texts from ``data_dir`` (a dataset or an image folder) or rendered scenes."""
    if data_dir is None:
        images, names, texts = _rendered(count, seed=seed, size=preprocess.image_size)
        source = "rendered synthetic scenes"
    else:
        images, names, texts = _from_folder(Path(data_dir), count, seed=seed)
        source = str(data_dir)
    texts = [texts[i % len(texts)] for i in range(len(names))]
    return Samples(
        pixel_values=pixels(images, preprocess=preprocess),
        input_ids=np.asarray(tokenizer(texts), dtype=np.int64),  # the model's or the export's tokenizer
        image_names=tuple(names),
        texts=tuple(texts),
        source=source,
    )


def pixels(images: Sequence[ImageSource], *, preprocess: PreprocessSpec) -> np.ndarray:
    """Image paths or PIL images -> (N, 3, S, S) float32 through the model's own eval transform."""
    from compir.train.transforms import eval_transform

    transform = eval_transform(preprocess)
    tensors = [transform(load_image(image)) for image in images]
    return torch.stack(tensors).numpy().astype(np.float32)


def _from_folder(root: Path, count: int, *, seed: int) -> tuple[list[ImageSource], list[str], list[str]]:
    if not root.is_dir():
        raise ContractError(f"calibration data folder {root} does not exist")
    dataset = _dataset_split(root)
    rng = np.random.default_rng(seed)
    if dataset is not None:
        names = list(dataset.gallery)
        picked = sorted(rng.choice(len(names), size=min(count, len(names)), replace=False).tolist())
        paths: list[ImageSource] = [dataset.image_path(names[i]) for i in picked]
        texts = [query.text for query in dataset.queries] or list(_FALLBACK_TEXTS)
        order = rng.permutation(len(texts))[:count]
        return paths, [names[i] for i in picked], [texts[i] for i in order]
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ContractError(f"{root} holds no dataset and no images ({', '.join(IMAGE_SUFFIXES)}); pass a dataset root or an image folder")
    picked = sorted(rng.choice(len(files), size=min(count, len(files)), replace=False).tolist())
    return [files[i] for i in picked], [files[i].name for i in picked], list(_FALLBACK_TEXTS)


def _dataset_split(root: Path) -> CirSplit | None:
    from compir.data.load import load_split

    for split in _SPLITS:
        try:
            found = load_split(root, split=split)
        except (CompirError, FileNotFoundError, KeyError, ValueError):
            continue
        if found.gallery:
            return found
    return None


def _rendered(count: int, *, seed: int, size: int) -> tuple[list[ImageSource], list[str], list[str]]:
    from compir.data.synth import sample_train_query
    from compir.data.synth_scene import render_scene

    rng = np.random.default_rng(seed)
    queries = [sample_train_query(rng) for _ in range(count)]
    images: list[ImageSource] = [render_scene(q.reference, size=size) for q in queries]
    return images, [q.reference.key for q in queries], [q.text for q in queries]
