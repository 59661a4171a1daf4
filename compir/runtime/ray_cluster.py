"""Joining or starting a Ray, for the optional Ray front ends (``index build --ray``, ``serve --ray``).

Ray is an optional extra: it is imported here, inside the functions, never at module level.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compir.errors import InputError

RAY_EXTRA = 'pip install "compir[ray]"'
LOCAL = "local"  # --ray without an address: start a Ray on this machine


def import_ray(part: str) -> Any:
    """The ``ray`` module with its ``part`` ("data" or "serve") importable, or an InputError
    naming the extra to install."""
    try:
        import importlib

        import ray

        importlib.import_module(f"ray.{part}")
    except ImportError as exc:
        what = {"data": "Ray Data", "serve": "Ray Serve"}.get(part, f"ray.{part}")
        raise InputError(f"--ray needs {what}, which is not installed ({exc.name}): {RAY_EXTRA}") from exc
    return ray


def join_ray(ray: Any, address: str | None, *, num_cpus: int | None = None) -> None:
    """Start a fresh Ray on this machine (``address`` None or ``"local"``; even where RAY_ADDRESS
    names another) or join the cluster at ``address``; an InputError naming it where that fails."""
    quiet: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "configure_logging": True}
    if not address or address == LOCAL:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, log_to_driver=False, **quiet)
        return
    _check_reachable(address)
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        # A cluster started with token authentication (recent Ray: on by default) refuses a client not set to it.
        auth = "" if os.environ.get("RAY_AUTH_MODE") else "; a cluster with token authentication needs RAY_AUTH_MODE=token here"
        raise InputError(f"cannot join the Ray cluster at --ray={address} ({exc}){auth}; start one (ray start --head) "
                         "or give a bare --ray to start a Ray on this machine") from exc


def _check_reachable(address: str) -> None:
    """InputError unless ``[ray://]host:port`` accepts a connection: Ray itself retries an
    unreachable GCS for minutes. ``auto`` (the cluster this machine runs) is left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise InputError(f"cannot reach the Ray cluster at --ray={address} ({exc}); start one (ray start --head) "
                         "or give a bare --ray to start a Ray on this machine") from exc


@contextmanager
def engine_logs(path: Path) -> Iterator[None]:
    """Everything written to this process's stderr while the block runs goes to the file ``path``
    (appended): Ray's Python loggers and progress bars (they write to ``sys.stderr``), and the lines
    its C++ core worker writes to file descriptor 2 (an error-level ``core_worker.cc`` line on
    every build), which no Ray setting sends elsewhere; so the terminal keeps compir's own lines."""
    sys.stderr.flush()
    # Ray's console handlers keep the sys.stderr of when they were made (e.g. a test's capture).
    handlers = [handler for name in list(logging.root.manager.loggerDict) if name == "ray" or name.startswith("ray.")
                for handler in logging.getLogger(name).handlers
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]
    streams = [handler.stream for handler in handlers]
    terminal, python_stderr = os.dup(2), sys.stderr
    with open(path, "a", encoding="utf-8", buffering=1) as log:
        try:
            os.dup2(log.fileno(), 2)
            sys.stderr = log
            for handler in handlers:
                handler.stream = log  # not setStream: it flushes the old stream, which may be closed
            yield
        finally:
            for handler, stream in zip(handlers, streams, strict=True):
                handler.stream = stream
            sys.stderr = python_stderr
            os.dup2(terminal, 2)
            os.close(terminal)
