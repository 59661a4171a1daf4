"""Validation of request inputs against the service limits; each refusal names the limit."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from PIL import Image

from compir.errors import InputError
from compir.images import load_image
from compir.service.config import Limits

T = TypeVar("T")


class LimitError(InputError):
    """A request exceeds a configured limit (answered with 413 for sizes, 422 otherwise)."""

    def __init__(self, message: str, *, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def check_k(k: int, limits: Limits) -> int:
    if not 1 <= k <= limits.max_k:
        raise LimitError(f"k={k} is outside 1..max_k={limits.max_k} (the server's {limits.option('max_k')})")
    return k


def check_text(text: str, limits: Limits, *, field: str = "text") -> str:
    if len(text) > limits.max_text_chars:
        raise LimitError(
            f"{field}: {len(text)} characters exceeds max_text_chars={limits.max_text_chars} "
            f"(the server's {limits.option('max_text_chars')})"
        )
    return text


def check_count(n: int, limits: Limits, *, what: str) -> None:
    if n > limits.max_batch_queries:
        raise LimitError(
            f"{n} {what} exceeds max_batch_queries={limits.max_batch_queries} "
            f"(the server's {limits.option('max_batch_queries')})",
            status=413,
        )


def check_bytes(data: bytes, limits: Limits, *, field: str) -> bytes:
    if len(data) > limits.max_upload_bytes:
        raise LimitError(
            f"{field}: {len(data)} bytes exceeds max_upload_bytes={limits.max_upload_bytes} "
            f"(the server's {limits.option('max_upload_bytes')})",
            status=413,
        )
    return data


def decode_b64(payload: str, limits: Limits, *, field: str) -> bytes:
    if len(payload) > limits.max_upload_bytes * 4 // 3 + 4:
        raise LimitError(
            f"{field}: the base64 image exceeds max_upload_bytes={limits.max_upload_bytes} once decoded",
            status=413,
        )
    try:
        return check_bytes(base64.b64decode(payload, validate=True), limits, field=field)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{field}: not valid base64 ({exc})") from exc


def decode_image(data: bytes, limits: Limits, *, field: str) -> Image.Image:
    """Decode an upload, refusing (before decoding) images over ``max_image_pixels`` with a 413."""
    size = _header_size(data)
    if size is None or size[0] * size[1] > limits.max_image_pixels:
        # None: over Pillow's own decompression-bomb limit, so large that Pillow will not even open it.
        pixels = f"{size[0]}x{size[1]} = {size[0] * size[1]}" if size else f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)}"
        raise LimitError(
            f"{field}: {pixels} pixels exceeds max_image_pixels={limits.max_image_pixels} "
            f"(the server's {limits.option('max_image_pixels')})",
            status=413,
        )
    image = load_image(data, name=field, max_pixels=limits.max_image_pixels, max_bytes=limits.max_upload_bytes)
    # PIL decodes lazily in places; a fully loaded copy is safe to hand to another thread.
    image.load()
    return image


def _header_size(data: bytes) -> tuple[int, int] | None:
    # Reads the header only; anything unreadable is left to load_image, which names the problem.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size
    except Image.DecompressionBombError:
        return None
    except Exception:
        return 0, 0


async def in_executor(executor: Executor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking work (decoding, model calls, disk writes) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))


async def require_json(request: Request) -> None:
    """A JSON body, each object's keys once: Python's parser keeps the last of two, silently."""
    kind = _content_type(request)
    if kind != "application/json":
        raise HTTPException(415, f"this endpoint takes application/json, not {kind or 'a body without a content type'}")
    try:  # FastAPI has read and parsed the body already (malformed JSON is its 422); the bytes are cached
        json.loads(await request.body(), object_pairs_hook=_refuse_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    twice: set[str] = set()
    for key, _ in pairs:
        (twice if key in seen else seen).add(key)
    if twice:
        raise InputError(f"the JSON body gives {', '.join(map(repr, sorted(twice)))} more than once in one object; give each once")
    return dict(pairs)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()
