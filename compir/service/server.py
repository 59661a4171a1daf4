"""Running the app under uvicorn: in the foreground (``compir serve``) or on a background thread
(tests, benchmarks, notebooks) with :class:`BackgroundServer`."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI


def uvicorn_options(log_level: str) -> dict[str, Any]:
    """uvicorn's settings for ``compir serve`` and :class:`BackgroundServer`: uvloop's event loop and
    httptools' HTTP parser (the serve extra installs both), and no access log unless ``log_level``
    shows it (uvicorn formats each access line before its logger drops it)."""
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {log_level!r}")
    loop = "asyncio" if sys.platform == "win32" else "uvloop"  # uvloop has no Windows build
    return {"loop": loop, "http": "httptools", "log_level": log_level, "access_log": level <= logging.INFO}


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``.

    Binds the socket itself (port 0 = a free port chosen by the OS, no race), starts uvicorn on
    a daemon thread and waits until it accepts connections; leaving the block shuts it down.
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=5, **uvicorn_options(log_level))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
