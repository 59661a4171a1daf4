"""Runtime preprocessing (PIL + numpy) against open_clip's eval transform (torchvision)."""

from __future__ import annotations

import dataclasses
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


# CLIP4Cir's target-pad mode: elongated images (ratio >= target_ratio) get a centred black border first.
TARGETPAD_SPECS = [
    PreprocessSpec(image_size=224, resize_mode="targetpad", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD, target_ratio=1.25),
    PreprocessSpec(image_size=40, resize_mode="targetpad", interpolation="bilinear", mean=CLIP_MEAN, std=CLIP_STD, target_ratio=1.0),
    PreprocessSpec(image_size=48, resize_mode="targetpad", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD, target_ratio=2.0),
]


def _clip4cir_targetpad_reference(spec: PreprocessSpec):  # type: ignore[no-untyped-def]
    """CLIP4Cir's ``targetpad_transform`` as published (TargetPad, Resize, CenterCrop, ToTensor,
    Normalize), written here independently of compir's code."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    def target_pad(image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < spec.target_ratio:
            return image
        scaled_max_wh = max(w, h) / spec.target_ratio
        hp, vp = max(int((scaled_max_wh - w) / 2), 0), max(int((scaled_max_wh - h) / 2), 0)
        return F.pad(image, [hp, vp, hp, vp], 0, "constant")

    mode = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
    return transforms.Compose([
        target_pad, transforms.Resize(spec.image_size, interpolation=mode), transforms.CenterCrop(spec.image_size),
        transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std),
    ])


@pytest.mark.parametrize("spec", TARGETPAD_SPECS, ids=lambda s: f"targetpad-{s.target_ratio}-{s.interpolation}-{s.image_size}")
def test_targetpad_matches_clip4cir_and_the_training_transform(spec: PreprocessSpec) -> None:
    from compir.train.transforms import eval_transform, train_transform

    reference = _clip4cir_targetpad_reference(spec)
    ours_torch, ours_train = eval_transform(spec), train_transform(spec)
    worst = {}
    for name, data in SOURCES:
        image = load_image(data, name=name)
        theirs = reference(image).numpy()
        runtime = preprocess_image(image, spec)
        training = ours_torch(image).numpy()
        assert runtime.shape == theirs.shape == training.shape == (3, spec.image_size, spec.image_size), name
        np.testing.assert_array_equal(training, theirs, err_msg=name)  # the torch path is theirs, bit for bit
        np.testing.assert_array_equal(ours_train(image).numpy(), training, err_msg=name)  # no augmentation (theirs)
        worst[name] = float(np.abs(runtime - theirs).max())
    assert max(worst.values()) <= 1e-5, worst


def test_targetpad_pads_only_elongated_images_with_a_centred_black_border() -> None:
    spec = TARGETPAD_SPECS[0]
    assert spec.target_padding(640, 480) == (0, 16)  # 1.33 >= 1.25: height -> 512
    assert spec.target_padding(480, 640) == (16, 0)
    assert spec.target_padding(500, 450) == (0, 0)  # 1.11 < 1.25: unchanged
    assert spec.target_padding(500, 33) == (0, 183)
    white = Image.new("RGB", (400, 100), (255, 255, 255))
    pixels = preprocess_image(white, dataclasses.replace(spec, image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    rows = pixels[0].mean(axis=1)  # (32,) per image row
    assert rows[0] < 0.05 and rows[-1] < 0.05 and rows[16] > 0.95  # black top and bottom, white centre
    np.testing.assert_allclose(rows, rows[::-1], atol=1e-6)  # centred


def test_targetpad_is_recorded_and_checked() -> None:
    from compir.errors import ContractError
    from compir.manifest import EncoderFingerprint
    from compir.runtime.preprocess import check_spec

    spec = TARGETPAD_SPECS[0]
    fingerprint = EncoderFingerprint(image_encoder_sha256="0" * 64, preprocess=spec, embed_dim=8, metric="cos")
    assert EncoderFingerprint.from_dict(fingerprint.to_dict(), source="test") == fingerprint
    assert fingerprint.to_dict()["preprocess"]["target_ratio"] == 1.25
    older = EncoderFingerprint(image_encoder_sha256="0" * 64, preprocess=SPECS[0], embed_dim=8, metric="cos")
    assert "target_ratio" not in older.to_dict()["preprocess"]  # fingerprints of other modes keep their digest
    for bad in (dataclasses.replace(spec, target_ratio=None), dataclasses.replace(spec, target_ratio=0.5),
                dataclasses.replace(SPECS[0], target_ratio=1.25)):
        with pytest.raises(ContractError, match="target_ratio"):
            check_spec(bad)
