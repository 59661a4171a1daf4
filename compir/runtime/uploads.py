"""Item ids and image files for items added to a gallery at run time."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from compir.errors import InputError

MAX_ID_CHARS = 256
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def validate_item_id(item_id: object) -> str:
    """Item ids are non-empty strings without control characters, at most MAX_ID_CHARS long."""
    if not isinstance(item_id, str) or not item_id.strip():
        raise InputError(f"item id must be a non-empty string, got {item_id!r}")
    if len(item_id) > MAX_ID_CHARS or any(ord(c) < 32 for c in item_id):
        raise InputError(f"item id {item_id[:40]!r}... is too long or has control characters")
    return item_id


def image_bytes(source: str | bytes | os.PathLike[str] | Image.Image, decoded: Image.Image) -> tuple[bytes, str]:
    """The bytes to keep for an added image and their file suffix: the original file when there
    is one, else the decoded image as PNG."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return path.read_bytes(), path.suffix.lower() or ".img"
    if isinstance(source, bytes):
        try:
            fmt = Image.open(io.BytesIO(source)).format or ""
        except Exception:  # already decoded once by load_image; keep the bytes regardless
            fmt = ""
        return source, _SUFFIXES.get(fmt, ".img")
    buffer = io.BytesIO()
    decoded.save(buffer, format="PNG")
    return buffer.getvalue(), ".png"
