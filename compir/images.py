"""Safe image decoding shared by every stage (datasets, training, runtime, service, demo).

Corrupt, truncated, empty, huge (decompression bomb) and odd-mode images become an
:class:`InputError` that names the image, never a crash or a hang.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from compir.errors import InputError

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; larger images are refused, not decoded
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

ImageSource = str | os.PathLike[str] | bytes | Image.Image


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode ``source`` (a path, raw bytes or a PIL image) to an RGB image.

    EXIF orientation: applied when decoding a file or bytes (the image is turned the way a
    viewer shows it); a PIL image handed in is taken as it is, never turned again, since the
    caller may already have applied its orientation (``ImageOps.exif_transpose``, a browser).
    Transparent images are composited on white (what a person sees), palette and grayscale
    images are converted, 16-bit samples are scaled by their bit depth (65535 -> 255).
    Raises InputError naming ``name`` (or the path) on any problem.
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "uploaded image")
    if isinstance(source, Image.Image):
        _check_pixels(source, label, max_pixels)
        return _to_rgb(source)
    data = _read_bytes(source, label, max_bytes)
    if not data:
        raise InputError(f"{label}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image, label, max_pixels)
            image.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{label}: image is too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{label}: not a readable image (unknown or corrupt format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{label}: corrupt or truncated image ({exc})") from exc
    transposed = ImageOps.exif_transpose(image) or image
    return _to_rgb(transposed)


def _read_bytes(source: str | os.PathLike[str] | bytes, label: str, max_bytes: int) -> bytes:
    if isinstance(source, bytes):
        if len(source) > max_bytes:
            raise InputError(f"{label}: {len(source)} bytes exceeds the limit of {max_bytes} bytes")
        return source
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{label}: image file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"{label}: {size} bytes exceeds the limit of {max_bytes} bytes")
    return path.read_bytes()


def _check_pixels(image: Image.Image, label: str, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"{label}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"{label}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (mode "I" is how Pillow widens 16-bit PNG/TIFF samples): map
        # 0..65535 to 0..255 by the bit depth, so a dark image stays dark. PIL's own
        # convert would clip every value above 255 to white.
        import numpy as np

        array = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.rint(array / 257.0).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")
