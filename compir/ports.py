"""Checking that a server can listen on a port before it loads anything slow (``compir serve``,
``compir demo``), so a taken port is one line and exit status 2, not a traceback after the model loads."""

from __future__ import annotations

import socket

from compir.errors import InputError

LOOPBACK = "127.0.0.1"


def check_port(port: int, *, host: str = LOOPBACK) -> None:
    """InputError unless a server can listen on ``host:port`` now."""
    if not 0 < port < 65536:
        raise InputError(f"--port {port} is not a TCP port (1-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"port {port} on {host} is in use or not allowed ({exc.strerror}); choose another with --port") from exc
