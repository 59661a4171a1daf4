"""Image preprocessing in PIL + numpy, identical to open_clip's eval transform (and, for
``resize_mode="targetpad"``, to CLIP4Cir's target-pad transform: see compir.train.transforms).

Driven only by :class:`compir.manifest.PreprocessSpec`. Reproduces torchvision's arithmetic
step by step (PIL resize with antialiasing, its output-size and centre-crop rounding, /255 and
normalisation in float32), so pixels match within 1e-5 of the training-time transform.
Images arrive decoded as RGB by :func:`compir.images.load_image`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from compir.errors import ContractError
from compir.manifest import PreprocessSpec

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def check_spec(spec: PreprocessSpec) -> None:
    """Raise ContractError unless the runtime implements ``spec`` exactly."""
    problem = spec.problem()
    if problem is not None:
        raise ContractError(f"manifest preprocess: {problem}")


def preprocess_image(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One RGB image -> ``pixel_values`` (3, S, S) float32, normalised."""
    size = spec.image_size
    resample = _INTERPOLATION[spec.interpolation]
    if image.mode != "RGB":
        image = image.convert("RGB")
    if spec.resize_mode == "targetpad":  # CLIP4Cir's: pad an elongated image towards target_ratio, then as "shortest"
        array = _target_pad(np.asarray(image), spec)
        image = _resize(Image.fromarray(array), _shortest_size((array.shape[1], array.shape[0]), size), resample)
        array = _center_crop_or_pad(np.asarray(image), size)
    elif spec.resize_mode == "squash":
        image = _resize(image, (size, size), resample)
        array = np.asarray(image)
    elif spec.resize_mode == "shortest":
        image = _resize(image, _shortest_size(image.size, size), resample)
        array = _center_crop_or_pad(np.asarray(image), size)
    else:  # "longest": fit the long side, pad the rest with black (open_clip's fill_color=0)
        width, height = image.size
        ratio = max(height / size, width / size)
        image = _resize(image, (round(width / ratio), round(height / ratio)), resample)
        array = _center_crop_or_pad(np.asarray(image), size)
    # (S, S, 3) uint8 -> (3, S, S) float32; same operation order as ToTensor + Normalize.
    pixels = array.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((pixels - mean) / std)


def preprocess_batch(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Images -> (B, 3, S, S) float32."""
    size = spec.image_size
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    for row, image in enumerate(images):
        batch[row] = preprocess_image(image, spec)
    return batch


def _resize(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    # torchvision returns the image untouched when it already has the requested size.
    return image if image.size == size else image.resize(size, resample)


def _shortest_size(image_size: tuple[int, int], target: int) -> tuple[int, int]:
    """torchvision's Resize(int): short side -> target, long side truncated (int(), not round)."""
    width, height = image_size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = target, int(target * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop_or_pad(array: np.ndarray, size: int) -> np.ndarray:
    """torchvision's CenterCrop: zero-pad a too-small side (left/top get the floor), then crop
    at ``int(round(excess / 2))`` (Python's round, halves to even)."""
    height, width = array.shape[:2]
    if size > height or size > width:
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        array = np.pad(array, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = array.shape[:2]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return array[top : top + size, left : left + size]



def _target_pad(array: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """CLIP4Cir's TargetPad on (H, W, 3): a centred black border (see PreprocessSpec.target_padding)."""
    pad_w, pad_h = spec.target_padding(array.shape[1], array.shape[0])
    return np.pad(array, ((pad_h, pad_h), (pad_w, pad_w), (0, 0))) if pad_w or pad_h else array
