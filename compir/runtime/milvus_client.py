"""The Milvus connection under :mod:`compir.runtime.milvus_store`: one client per URI and process,
every call's failure turned into one of compir's errors, and the only way a filter is written.

Errors: a Milvus *server* that cannot be reached (stopped, restarting: gRPC UNAVAILABLE, pymilvus's
"Fail connecting to server") or that is still loading the collection after a restart ("collection
not loaded", which it clears itself once loaded) is an :class:`~compir.errors.UnavailableError`
(HTTP 503 with Retry-After): the same client reconnects by itself when the server is back, so a
service recovers without a restart. Any other failure, and every failure of a Milvus Lite file
(embedded: it never restarts under a process), is a :class:`~compir.errors.ContractError`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compir.errors import ContractError, UnavailableError
from compir.runtime.writer_lock import lite_lock_holder

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # a collection or column name
RETRY_AFTER_S = 5  # what a 503 tells a client to wait while the server restarts or reloads
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})  # in a "..." filter literal
_UNAVAILABLE_CODES = {2, 101}  # pymilvus: cannot connect; Milvus: collection not loaded (yet, after a restart)
_UNAVAILABLE_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
_CLIENTS: dict[str, Any] = {}  # one client per URI and process (Milvus Lite allows one opener per file)
_CLIENTS_LOCK = threading.Lock()


def is_server(uri: str) -> bool:
    """A Milvus server (``http://host:19530``), not a Milvus Lite file."""
    return "://" in uri


def connect(uri: str) -> Any:
    """A MilvusClient for ``uri``, shared within the process; ContractError when it cannot connect."""
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        raise ContractError("the Milvus index backend needs pymilvus and milvus-lite: pip install 'compir[milvus]'") from exc
    # pymilvus and Milvus Lite log every failure with a traceback; compir raises its own error naming it.
    for name in ("pymilvus", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # Milvus Lite's HNSW: 4 INFO lines on which CPU build it loads
    with _CLIENTS_LOCK:
        if uri not in _CLIENTS:
            try:
                _CLIENTS[uri] = MilvusClient(uri=uri, timeout=30)
            except Exception as exc:  # pymilvus raises MilvusException or its subclasses, and grpc errors
                holder = lite_lock_holder(Path(uri)) if not is_server(uri) else None
                if holder is not None:
                    raise ContractError(f"another process ({holder}) holds the Milvus Lite file {uri}: Milvus Lite serves one "
                                        "process per file; stop that one, or share one gallery between processes through a "
                                        "Milvus server (--milvus-uri http://host:19530)") from exc
                raise ContractError(f"cannot open Milvus at {uri}: {reason(exc)}; start the server, or check the URI / "
                                    "the Milvus Lite file's folder") from exc
        return _CLIENTS[uri]


def call(method: Any, *args: Any, what: str, uri: str, **kwargs: Any) -> Any:
    """``method(*args, **kwargs)``, any Milvus failure turned into an UnavailableError (a server
    that is down or restarting) or a ContractError, naming ``what``."""
    try:
        return method(*args, **kwargs)
    except Exception as exc:  # MilvusException, grpc.RpcError, ConnectionError: all mean the same to the caller
        if is_server(uri) and _unavailable(exc):
            raise UnavailableError(f"Milvus at {uri} is unreachable or restarting ({what}: {reason(exc)}); retry in a few "
                                   "seconds", retry_after_s=RETRY_AFTER_S) from exc
        raise ContractError(f"Milvus at {uri} failed to {what}: {reason(exc)}") from exc


def server_version(client: Any, uri: str) -> tuple[int, int]:
    """(major, minor) of a Milvus server ("v2.3.5-lite" -> (2, 3))."""
    text = str(call(client.get_server_version, what="read the server version", uri=uri))
    found = re.match(r"v?(\d+)\.(\d+)", text)
    if found is None:
        raise ContractError(f"Milvus at {uri} reports version {text!r}, not major.minor")
    return int(found.group(1)), int(found.group(2))


def in_filter(column: str, values: Sequence[str] | Sequence[int]) -> str:
    """The filter ``column in ["v1", "v2", ...]`` (or ``[1, 2, ...]`` for an integer column): every
    filter is built here or by :func:`after_filter`, so no value (an item id, an image path) ever
    becomes expression syntax.

    Each value is a double-quoted literal escaped for both grammars compir meets: a Milvus server
    (Plan.g4's C-style escapes, then Go's ``strconv.Unquote``) and Milvus Lite 3 (its own lexer,
    which knows only the escapes of backslash, both quotes, n, r and t). So backslash, the double
    quote, CR, LF and tab are escaped (a raw CR or LF ends a literal in both) and every other
    character, the single quote included, stands for itself. Filter templates (``filter_params``)
    would avoid escaping on a server, but Milvus Lite ignores them.
    """
    return f"{_column(column)} in [{', '.join(_literal(value) for value in values)}]"


def after_filter(column: str, value: str) -> str:
    """The filter ``column > "value"``: a page of a listing ordered by ``column`` (pymilvus's own
    query iterator writes this one unescaped, so a page that ends on an id holding ``"`` breaks it)."""
    return f"{_column(column)} > {_string_literal(value)}"


def reason(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).splitlines()[0][:300]


def _column(column: str) -> str:
    if not NAME.fullmatch(column):
        raise ValueError(f"not a column name: {column!r}")
    return column


def _string_literal(value: str) -> str:
    return '"' + value.translate(_ESCAPES) + '"'


def _literal(value: str | int) -> str:
    if isinstance(value, str):
        return _string_literal(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(int(value))  # int(): an int subclass's own __str__ never reaches the filter
    raise TypeError(f"a filter value must be a str or an int, not {type(value).__name__}")


def _unavailable(exc: Exception) -> bool:
    code = getattr(exc, "code", None)  # MilvusException: an int or a grpc.StatusCode; grpc.RpcError: a method
    if callable(code):
        code = code()
    if isinstance(code, int):
        return code in _UNAVAILABLE_CODES
    return getattr(code, "name", None) in _UNAVAILABLE_GRPC
