"""One ASGI middleware in front of every route: API key, request-size cap, complete multipart
bodies, latency recording.

It runs before FastAPI reads a body, so an unauthenticated or oversized upload is refused
without being parsed. A multipart body that ends before its closing boundary (cut short, maybe
inside a file part) is a 400: the form parser would otherwise drop the unfinished part silently.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compir.service.stats import LatencyRecorder

API_KEY_HEADER = "x-api-key"
OPEN_PATHS = frozenset({"/health", "/ready"})  # probes work without the key


class Gatekeeper:
    def __init__(
        self,
        app: ASGIApp,
        *,
        recorder: LatencyRecorder,
        api_key: str | None,
        max_request_bytes: int,
    ) -> None:
        self.app = app
        self.recorder = recorder
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                status["started"] = True
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _send_json(send_tracked, *refusal)
                return
            await self.app(scope, self._checked(receive, close=_multipart_close(scope)), send_tracked)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "(unmatched)"
            self.recorder.record(
                f"{scope['method']} {template}",
                latency_ms=(time.perf_counter() - start) * 1000.0,
                status=int(status["code"]),
            )

    def _refusal(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(API_KEY_HEADER)
            if given is None:
                return 401, "missing API key: send it in the X-API-Key header", {"www-authenticate": "X-API-Key"}
            if not secrets.compare_digest(given.encode(), self.api_key.encode()):
                return 401, "wrong API key (header X-API-Key)", {"www-authenticate": "X-API-Key"}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return 413, self._too_large_message(int(length)), {}
        return None

    def _too_large_message(self, size: int | None) -> str:
        got = f"{size} bytes" if size is not None else "the request body"
        return (
            f"{got} exceeds max_request_bytes={self.max_request_bytes} "
            "(max_upload_bytes x max_batch_queries + 1 MiB; raise --max-upload-bytes)"
        )

    def _checked(self, receive: Receive, *, close: bytes | None) -> Receive:
        # Chunked uploads carry no Content-Length: count what actually arrives. FastAPI re-raises
        # HTTPException from body parsing, so each refusal here becomes its status code.
        seen = 0
        closed = False
        tail = b""  # the last bytes seen, for a close delimiter split across chunks

        async def receive_checked() -> Message:
            nonlocal seen, closed, tail
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                seen += len(body)
                if seen > self.max_request_bytes:
                    raise HTTPException(413, self._too_large_message(None))
                if close is not None and not closed:
                    window = tail + body
                    closed = close in window
                    tail = window[-(len(close) - 1):]
                    if not closed and not message.get("more_body", False):
                        raise HTTPException(400, f"the multipart body is cut short: it ends before its closing boundary "
                                                 f"{close.decode('latin-1')!r} (an incomplete upload)")
            return message

        return receive_checked


def _multipart_close(scope: Scope) -> bytes | None:
    """The close delimiter (``--BOUNDARY--``) a multipart/form-data body must end with, else None."""
    headers = dict(scope["headers"])
    kind, _, params = headers.get(b"content-type", b"").decode("latin-1").partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value.strip('"'):
            return b"--" + value.strip('"').encode("latin-1") + b"--"
    return None  # no boundary: the form parser refuses the body itself


async def _send_json(send: Send, status: int, detail: str, extra_headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra_headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
