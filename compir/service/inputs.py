"""Validation of request inputs against the service limits; each refusal names the limit."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from fastapi import HTTPException, Request, UploadFile
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


async def read_upload(upload: UploadFile, limits: Limits, *, field: str) -> bytes:
    # Read one byte past the limit: enough to refuse without holding a huge file in memory.
    data = await upload.read(limits.max_upload_bytes + 1)
    return check_bytes(data, limits, field=field)


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
    """Decode an upload, refusing (before decoding) images over ``max_image_pixels``."""
    width, height = _header_size(data)
    if width * height > limits.max_image_pixels:
        raise LimitError(
            f"{field}: {width}x{height} = {width * height} pixels exceeds max_image_pixels="
            f"{limits.max_image_pixels} (the server's {limits.option('max_image_pixels')})",
            status=413,
        )
    image = load_image(data, name=field, max_pixels=limits.max_image_pixels, max_bytes=limits.max_upload_bytes)
    # PIL decodes lazily in places; a fully loaded copy is safe to hand to another thread.
    image.load()
    return image


def _header_size(data: bytes) -> tuple[int, int]:
    # Reads the header only; anything unreadable is left to load_image, which names the problem.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size
    except Exception:
        return 0, 0


async def in_executor(executor: Executor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking work (decoding, model calls, disk writes) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))


def require_form(request: Request) -> None:
    """Refuse a body that is not a form before FastAPI reports its fields as merely missing."""
    kind = _content_type(request)
    if kind and kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise HTTPException(415, f"this endpoint takes multipart/form-data, not {kind}")


def refuse_blank_fields(*names: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing form fields sent empty (``k=``): FastAPI would read them as absent and
    use the default, silently. The form is parsed already, so this reads no body."""

    async def refuse(request: Request) -> None:
        form = await request.form()
        for name in names:
            if any(value == "" for value in form.getlist(name)):
                raise InputError(f"form field {name!r} is empty; give a value or leave the field out")

    return refuse


def require_json(request: Request) -> None:
    kind = _content_type(request)
    if kind != "application/json":
        raise HTTPException(415, f"this endpoint takes application/json, not {kind or 'a body without a content type'}")


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()
