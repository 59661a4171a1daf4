"""The floor under ``compir serve``'s ``POST /search``, and where a request's CPU goes, by thread.

:func:`floor_app` is an ASGI app that answers ``POST /search`` with the work ``compir serve``'s route
does for a composed upload and nothing else: the service's strict multipart parser, the image decode
(``decode_image``), ``ServiceEngine.search`` and the route's own orjson encoding (``search_json``). No middleware, no
routing, no checks of the form's fields. Run under uvicorn with ``compir serve``'s settings, it is
the least an asyncio HTTP server in Python can add to a search: with ``COMPIR_FLOOR_HOP=1`` the
decode and search run on a worker thread, as ``compir serve`` runs them; with ``0`` on the event
loop itself (which no real server may do: one search would block every other request).

:func:`cpu_per_call` reads each thread's CPU time of a process from ``/proc`` (Linux) around N calls,
so a request's cost is split into the event loop thread, the other threads (the worker and
onnxruntime's pools) and the calling client thread.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], ASGIReceive, ASGISend], Awaitable[None]]


def floor_app() -> ASGIApp:
    """The floor app (a factory for ``uvicorn.run(..., factory=True)``) over the export and index
    named by ``COMPIR_FLOOR_EXPORT`` and ``COMPIR_FLOOR_INDEX``; ``COMPIR_FLOOR_HOP`` (1 or 0) as above."""
    from compir.runtime.retriever import Retriever
    from compir.service.config import BatchingConfig, ServiceConfig
    from compir.service.engine import SearchQuery, ServiceEngine
    from compir.service.forms import parse_multipart
    from compir.service.inputs import decode_image
    from compir.service.routes_search import search_json

    retriever = Retriever.from_dirs(os.environ["COMPIR_FLOOR_EXPORT"], os.environ["COMPIR_FLOOR_INDEX"], providers=["cpu"])
    engine = ServiceEngine(retriever, config=ServiceConfig(batching=BatchingConfig(enabled=False)))
    limits, hop = engine.config.limits, os.environ.get("COMPIR_FLOOR_HOP", "1") == "1"
    executor = ThreadPoolExecutor(max_workers=engine.config.worker_threads)

    def answer(body: bytes, content_type: str) -> bytes:
        parts = {part.name: part.data for part in parse_multipart(body, content_type)}
        image = decode_image(parts["reference"], limits, field="reference") if "reference" in parts else None
        query = SearchQuery(text=parts.get("text", b"").decode(), k=int(parts.get("k", b"10")), reference_image=image)
        return search_json(engine.search(query))

    async def app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        out = b"{}"
        if scope["method"] == "POST" and scope["path"] == "/search":
            content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            body = b"".join(chunks)
            if hop:
                out = await asyncio.get_running_loop().run_in_executor(executor, answer, body, content_type)
            else:
                out = answer(body, content_type)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})

    return app


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each live thread of process ``pid``, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # the thread ended between the listing and the read
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) ": state is field 0, utime 11, stime 12
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_per_call(pid: int, call: Callable[[], object], n: int) -> dict[str, float]:
    """ms of CPU per call over ``n`` calls of ``call``: process ``pid``'s main thread (the event loop
    of a uvicorn server, the caller in process), its other threads, and the calling thread itself
    (the client; in process it is the main thread, counted there). ``/proc`` counts in clock ticks
    (10 ms where ``SC_CLK_TCK`` is 100), so a figure's resolution is a tick over ``n``: 0.03 ms at 300."""
    before, client = thread_cpu_s(pid), time.thread_time()
    for _ in range(n):
        call()
    client, after = time.thread_time() - client, thread_cpu_s(pid)
    spent = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    main = spent.pop(pid, 0.0)
    figures = {"main thread": main * 1000.0 / n, "other threads": sum(spent.values()) * 1000.0 / n}
    if pid != os.getpid():
        figures["client thread"] = client * 1000.0 / n
    return figures
