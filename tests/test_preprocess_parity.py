"""Runtime preprocessing (PIL + numpy) against open_clip's eval transform (torchvision)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from compir.images import load_image
from compir.manifest import PreprocessSpec
from compir.runtime.preprocess import preprocess_batch, preprocess_image

open_clip_transform = pytest.importorskip("open_clip.transform", reason="parity needs open_clip")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: smooth gradients, edges and noise (resampling sees all)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), ((x + y) % 17) / 16], axis=-1) * 200
    base[(x // 7 + y // 5) % 3 == 0] += 40
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _exif_rotated(seed: int) -> bytes:
    image = Image.fromarray(_photo(61, 37, seed))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    return _encoded(image, "JPEG", exif=exif, quality=95)


def _sources() -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = []
    for number, (w, h) in enumerate([(224, 224), (640, 480), (480, 640), (33, 500), (500, 33), (17, 23), (1, 1), (300, 301), (1000, 999)]):
        cases.append((f"rgb-{w}x{h}", _encoded(Image.fromarray(_photo(w, h, number)), "PNG")))
    photo = Image.fromarray(_photo(97, 131, 50))
    cases.append(("grayscale", _encoded(photo.convert("L"), "PNG")))
    cases.append(("grayscale-16bit", _encoded(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), "PNG")))
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 97, dtype=np.uint8), (131, 1))))
    cases.append(("rgba", _encoded(rgba, "PNG")))
    cases.append(("palette", _encoded(photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG")))
    cases.append(("palette-transparent", _encoded(photo.convert("P"), "GIF", transparency=0)))
    cases.append(("cmyk-jpeg", _encoded(photo.convert("CMYK"), "JPEG", quality=90)))
    cases.append(("jpeg", _encoded(photo, "JPEG", quality=80)))
    cases.append(("exif-rotated", _exif_rotated(51)))
    return cases


SOURCES = _sources()
SPECS = [
    PreprocessSpec(image_size=224, resize_mode="shortest", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD),
    PreprocessSpec(image_size=32, resize_mode="shortest", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    PreprocessSpec(image_size=64, resize_mode="squash", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD),
    PreprocessSpec(image_size=48, resize_mode="longest", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.resize_mode}-{s.interpolation}-{s.image_size}")
def test_matches_open_clip_eval_transform(spec: PreprocessSpec) -> None:
    reference = open_clip_transform.image_transform(
        spec.image_size, is_train=False, mean=spec.mean, std=spec.std,
        resize_mode=spec.resize_mode, interpolation=spec.interpolation,
    )
    worst = {}
    for name, data in SOURCES:
        image = load_image(data, name=name)
        ours = preprocess_image(image, spec)
        theirs = reference(image).numpy()
        assert ours.shape == theirs.shape == (3, spec.image_size, spec.image_size), name
        assert ours.dtype == np.float32
        worst[name] = float(np.abs(ours - theirs).max())
    assert max(worst.values()) <= 1e-5, worst


def test_exif_rotation_is_applied_before_resizing() -> None:
    image = load_image(_exif_rotated(3))
    assert image.size == (37, 61)  # stored 61x37, displayed rotated


def test_batch_equals_single_images() -> None:
    spec = SPECS[0]
    images = [load_image(data) for _, data in SOURCES[:4]]
    batch = preprocess_batch(images, spec)
    assert batch.shape == (4, 3, 224, 224)
    for row, image in enumerate(images):
        np.testing.assert_array_equal(batch[row], preprocess_image(image, spec))
