"""One ASGI middleware in front of every route: API key, request-size cap, latency recording.

It runs before FastAPI reads a body, so an unauthenticated or oversized upload is refused
without being read. (A multipart body cut short is refused by the strict form reader,
:mod:`compir.service.forms`.)

Open without the key: the probes (``/health``, ``/ready``) and the API's documentation
(``/docs``, ``/redoc``, ``/openapi.json`` and their static assets), which hold no data, so that a
browser can open them; the docs' Authorize button then sends the key with each try.
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
OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPEN_PREFIX = "/static-offline-docs/"  # Swagger UI's and ReDoc's files (fastapi-offline)


def is_open(path: str) -> bool:
    """Whether ``path`` is answered without the API key (see the module docstring)."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIX)


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
            await self.app(scope, self._checked(receive), send_tracked)
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
        if self.api_key is not None and not is_open(scope["path"]):
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

    def _checked(self, receive: Receive) -> Receive:
        # Chunked uploads carry no Content-Length: count what actually arrives. FastAPI re-raises
        # HTTPException from body reading, so the refusal here becomes a 413.
        seen = 0

        async def receive_checked() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_request_bytes:
                    raise HTTPException(413, self._too_large_message(None))
            return message

        return receive_checked


async def _send_json(send: Send, status: int, detail: str, extra_headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra_headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
