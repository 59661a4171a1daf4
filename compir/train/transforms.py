"""Image transforms: open_clip's own, built from a PreprocessSpec, CLIP4Cir's target-pad transform
(``resize_mode="targetpad"``), plus a fast path for images that are already at the model's size
(the synthetic renderer draws them so)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from compir.data.types import CirSplit
from compir.images import load_image
from compir.manifest import PreprocessSpec

ImageTransform = Callable[[Image.Image], torch.Tensor]


def eval_transform(preprocess: PreprocessSpec) -> ImageTransform:
    """open_clip's eval transform (resize, center crop, to tensor, normalise) for ``preprocess``.

    Decode images with ``compir.images.load_image`` first. Output: (3, S, S) float32.
    """
    return _open_clip_transform(preprocess, is_train=False)


def train_transform(preprocess: PreprocessSpec) -> ImageTransform:
    """open_clip's training transform (random resized crop, scale 0.9-1) for real datasets; with
    "targetpad", the eval transform (CLIP4Cir trains without augmentation)."""
    return _open_clip_transform(preprocess, is_train=True)


def _open_clip_transform(preprocess: PreprocessSpec, *, is_train: bool) -> ImageTransform:
    if preprocess.resize_mode == "targetpad":  # open_clip has no such mode; CLIP4Cir trains without augmentation
        return _target_pad_transform(preprocess)
    from open_clip.transform import image_transform

    return image_transform(
        preprocess.image_size,
        is_train=is_train,
        mean=preprocess.mean,
        std=preprocess.std,
        resize_mode=preprocess.resize_mode,
        interpolation=preprocess.interpolation,
    )


def _target_pad_transform(preprocess: PreprocessSpec) -> ImageTransform:
    """CLIP4Cir's ``targetpad_transform``: TargetPad, Resize(short side), CenterCrop, ToTensor, Normalize."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    interpolation = InterpolationMode.BICUBIC if preprocess.interpolation == "bicubic" else InterpolationMode.BILINEAR

    return transforms.Compose([
        _TargetPad(preprocess),
        transforms.Resize(preprocess.image_size, interpolation=interpolation),
        transforms.CenterCrop(preprocess.image_size),
        transforms.ToTensor(),
        transforms.Normalize(preprocess.mean, preprocess.std),
    ])


class _TargetPad:
    """CLIP4Cir's TargetPad: a centred black border (see PreprocessSpec.target_padding); a class, so
    data-loader workers can pickle it."""

    def __init__(self, preprocess: PreprocessSpec) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Image.Image) -> Image.Image:
        from torchvision.transforms import functional

        pad_w, pad_h = self.preprocess.target_padding(*image.size)
        padded: Image.Image = functional.pad(image, [pad_w, pad_h, pad_w, pad_h], fill=0, padding_mode="constant")
        return padded


def pixels_to_tensor(images: list[Image.Image], preprocess: PreprocessSpec) -> torch.Tensor:
    """A batch of RGB images already at ``image_size`` -> (B, 3, S, S) normalised float32.

    Equal to :func:`eval_transform` for such images (resize and crop are no-ops), ~10x faster.
    """
    size = preprocess.image_size
    for image in images:
        if image.size != (size, size):
            raise ValueError(f"pixels_to_tensor needs {size}x{size} images, got {image.size}; use eval_transform")
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])  # (B, S, S, 3)
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).div_(255.0)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean) / std


def split_pixels(split: CirSplit, names: Sequence[str], transform: ImageTransform) -> torch.Tensor:
    """(len(names), 3, S, S): the split's images ``names``, decoded and transformed."""
    return torch.stack([transform(load_image(split.image_path(name), name=name)) for name in names])
