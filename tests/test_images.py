"""compir.images.load_image: nothing silently reinterpreted (bit depth, EXIF orientation)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from compir.images import load_image


def _encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _dark_16bit() -> np.ndarray:
    """(40, 50) uint16 samples up to 5140 = 20 * 257: a dark image whose 8-bit peak is 20."""
    return (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) % 21) * 257


def test_16bit_png_is_scaled_by_bit_depth_not_by_its_own_peak() -> None:
    samples = _dark_16bit()
    image = load_image(_encoded(Image.fromarray(samples), "PNG"))
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels.max() == 20  # not stretched to 255
    np.testing.assert_array_equal(pixels[..., 0], samples // 257)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16bit_pil_images_are_scaled_by_bit_depth(mode: str) -> None:
    samples = _dark_16bit()
    source = Image.fromarray(samples if mode == "I;16" else samples.astype(np.int32))
    assert source.mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(source))[..., 0], samples // 257)


def test_full_range_16bit_matches_its_8bit_twin() -> None:
    eight = np.random.default_rng(0).integers(0, 256, (17, 23), dtype=np.uint8)
    sixteen = load_image(_encoded(Image.fromarray(eight.astype(np.uint16) * 257), "PNG"))
    np.testing.assert_array_equal(np.asarray(sixteen), np.asarray(Image.fromarray(eight).convert("RGB")))


def _exif_rotated_jpeg() -> bytes:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 61, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    return _encoded(image, "JPEG", exif=exif, quality=95)


def test_exif_orientation_is_applied_to_files_and_bytes(tmp_path: Path) -> None:
    data = _exif_rotated_jpeg()
    assert load_image(data).size == (37, 61)  # stored 61x37, displayed turned
    path = tmp_path / "turned.jpg"
    path.write_bytes(data)
    assert load_image(path).size == (37, 61)


def test_a_pil_image_already_turned_by_the_caller_is_not_turned_again() -> None:
    opened = Image.open(io.BytesIO(_exif_rotated_jpeg()))
    turned = opened.transpose(Image.Transpose.ROTATE_270)  # the caller applies the orientation itself
    assert "exif" in turned.info  # the orientation tag travels with it
    result = load_image(turned)
    assert result.size == turned.size == (37, 61)
    np.testing.assert_array_equal(np.asarray(result), np.asarray(turned.convert("RGB")))
    assert load_image(ImageOps.exif_transpose(opened)).size == (37, 61)


def test_a_pil_image_is_taken_as_it_is() -> None:
    opened = Image.open(io.BytesIO(_exif_rotated_jpeg()))
    assert load_image(opened).size == opened.size == (61, 37)  # the documented rule: PIL images are not turned
