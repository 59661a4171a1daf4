"""Item ids and image files for items added to a gallery at run time.

Item id grammar: a relative POSIX-style path, ``segment ("/" segment)*``, at most MAX_ID_CHARS
characters, as ``compir index build`` writes them (``a/b`` for ``a/b.png``). A segment is not
empty, not ``.`` or ``..``, has no backslash, and does not start or end with whitespace. No
character may be a control character, a lone surrogate (what Python makes of a file name that is
not UTF-8), an invisible format character (bidirectional controls such as U+202E, zero-width
characters such as U+200B) or a space other than U+0020 (NBSP, line separators): these make one
id look like another, or cannot be sent as JSON. So ``/etc/x``, ``a/../b``, ``a//b``, ``a/``,
``a\\b``, ``" a"`` and ``"a\\u202eb"`` are refused.

Upload names: a file uploaded without an explicit id (HTTP ``POST /gallery/items``, the demo's
"Add to gallery") gets the id :func:`upload_item_id` gives: its name after the last ``/`` or
``\\``, without its extension (``../../evil.png`` and ``a/b.png`` -> ``evil``, ``b``), which must
then follow the grammar.
"""

from __future__ import annotations

import io
import os
import unicodedata
from pathlib import Path, PurePosixPath

from PIL import Image

from compir.errors import InputError

MAX_ID_CHARS = 256
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def validate_item_id(item_id: object) -> str:
    """``item_id`` if it follows the id grammar (module docstring), else an InputError saying why."""
    if not isinstance(item_id, str) or not item_id:
        raise InputError(f"item id must be a non-empty string, got {item_id!r}")
    problem = _id_problem(item_id)
    if problem:
        shown = repr(item_id[:60]) + ("..." if len(item_id) > 60 else "")
        raise InputError(f"item id {shown} {problem} (ids are relative paths like 'a/b')")
    return item_id


def upload_item_id(filename: str | None) -> str:
    """The id of a file uploaded without one (module docstring): ``dir/x.png`` -> ``x``, checked
    against the grammar. Only the last segment counts, whichever separator the client used
    (browsers send the bare name; some send ``C:\\fakepath\\x.png``), so no upload names a folder."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    stem = PurePosixPath(name).stem if name not in ("", ".", "..") else ""
    if not stem:
        raise InputError(f"file name {filename!r} gives no item id; name the file, or give its id")
    return validate_item_id(stem)


# Characters refused anywhere in an id, by Unicode category (see the module docstring).
_REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cs": "a lone surrogate (what Python makes of a file name that is not UTF-8)",
    "Cf": "an invisible format character (bidirectional control or zero-width)",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Zs": "a space other than U+0020",
}


def _id_problem(item_id: str) -> str | None:
    if len(item_id) > MAX_ID_CHARS:
        return f"is {len(item_id)} characters long; the limit is {MAX_ID_CHARS}"
    for char in item_id:
        what = _REFUSED_CATEGORIES.get(unicodedata.category(char)) if char != " " else None
        if what:
            return f"has U+{ord(char):04X}, {what}"
    if "\\" in item_id:
        return "has a backslash"
    if item_id.startswith("/"):
        return "is an absolute path"
    for segment in item_id.split("/"):
        if not segment:
            return "has an empty path segment"
        if segment in (".", ".."):
            return f"has a {segment!r} path segment"
        if segment != segment.strip():
            return "has a path segment that starts or ends with whitespace"
    return None


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
