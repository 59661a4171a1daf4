"""The benchmarks' HTTP client: one keep-alive ``http.client`` connection per client thread, sending
request bodies encoded once up front, so the client costs as little per request as a Python client can
(about a tenth of httpx's per-request work) and the server, not the client, is what a benchmark measures.
"""

from __future__ import annotations

import http.client
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class EncodedRequest:
    """A request body and its Content-Type, encoded once and sent many times."""

    body: bytes
    content_type: str


def encode_multipart(*, files: Mapping[str, tuple[str, bytes, str]], data: Mapping[str, str]) -> EncodedRequest:
    """The multipart/form-data body that httpx sends for ``files=`` and ``data=``, byte for byte."""
    import httpx

    request = httpx.Request("POST", "http://localhost/", files=files, data=data)
    return EncodedRequest(request.read(), request.headers["content-type"])


class KeepAliveClient:
    """One persistent HTTP/1.1 connection; ``post`` / ``get`` return (status, body bytes).

    Not thread-safe: give each client thread its own. When the server has closed an idle connection
    (uvicorn does after 5 s), the request is sent once more on a new one, as httpx's pool does."""

    def __init__(self, url: str, *, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"KeepAliveClient takes an http://HOST:PORT url, not {url!r}")
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)

    def post(self, path: str, request: EncodedRequest) -> tuple[int, bytes]:
        return self._send("POST", path, request.body, {"Content-Type": request.content_type})

    def get(self, path: str) -> tuple[int, bytes]:
        return self._send("GET", path, None, {})

    def close(self) -> None:
        self._conn.close()

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                self._conn.request(method, path, body=body, headers=headers)
                response = self._conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._conn.close()  # the next request opens a new connection
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")
