"""Where one composed HTTP request's time goes: ``python -m benchmarks.profile_request [--requests N] [--py-spy S]``.

Builds the tiny export and index of ``compir bench service --quick`` in a temporary folder, then
times each part alone, as the median of N (default 300) one-at-a-time calls:

- in process: the request as ``compir bench service`` times it (``Retriever.search_detailed`` on
  the PNG's bytes), the service's image decode alone (``decode_image``: its pixel-limit check +
  decode) and the encoders + index alone (a decoded image in);
- the service's strict multipart parser on the very body the client sends (``parse_multipart``);
- one hop from the event loop (uvloop, as ``compir serve`` runs) to a worker thread and back;
- the response's JSON encoding, FastAPI's way (a ``SearchOut`` model validated and dumped by
  pydantic) and orjson's (a dict of 10 hits);
- the whole app in process: ``POST /search`` and ``GET /health`` sent to the ASGI app as uvicorn
  would, no socket (the middleware, FastAPI's routing and dependencies, the form, the decode, the
  search, the JSON);
- over HTTP to ``compir serve`` (a child process, batching off), each client on one keep-alive
  connection: a bare ASGI app under the same uvicorn settings (uvicorn + loopback + client, the
  floor of any request), ``GET /health`` and ``POST /search`` with ``http.client``, and
  ``POST /search`` with httpx;
- the floor under ``POST /search`` (:mod:`benchmarks.request_floor`): the same parse, decode, search and
  JSON in a framework-free ASGI app under the same uvicorn settings, its search on a worker thread as
  ``compir serve`` runs it, and on the event loop itself (no hop);
- CPU per request by thread (``/proc``, Linux): in process (the calling thread, onnxruntime's pool
  threads), and over HTTP to ``compir serve`` and to the floor (the event loop thread, the worker and
  onnxruntime's threads, the client's thread). Once clients keep the cores busy, requests/s is the
  cores over CPU per request, so CPU in process / CPU over HTTP is the ceiling of the ratio the
  service bench reports.

The derived rows split the HTTP request: FastAPI and the middleware around the work (app in process
minus decode and search), uvicorn and the socket (HTTP minus app in process) and httpx's own cost
(httpx minus http.client). ``--py-spy S`` also samples the server for S seconds under one client's
load with py-spy (when installed) and prints the functions it spent most time in.
Prints one JSON object and the table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench_service import _free_port, _prepare, _Server
from benchmarks.common import markdown_table
from benchmarks.http_client import EncodedRequest, KeepAliveClient, encode_multipart
from benchmarks.request_floor import cpu_per_call

IN_PROCESS = "in process: search_detailed on the PNG bytes (the bench's in-process request)"
DECODE = "of which: decode_image (pixel check + decode)"
ENCODE = "of which: encoders + index (decoded image in)"
PARSE = "multipart parse (parse_multipart)"
HOP = "one event loop -> worker thread -> loop hop (uvloop)"
JSON_FASTAPI = "JSON: SearchOut validated + dumped by pydantic (FastAPI's way)"
JSON_ORJSON = "JSON: orjson.dumps of the same dict"
APP_SEARCH = "app in process: POST /search through the ASGI app (no socket)"
APP_HEALTH = "app in process: GET /health through the ASGI app"
HTTP_BARE = "HTTP: bare ASGI app under uvicorn, http.client (the floor)"
HTTP_HEALTH = "HTTP: GET /health, http.client"
HTTP_SEARCH = "HTTP: POST /search, http.client"
HTTP_HTTPX = "HTTP: POST /search, httpx"
FLOOR_HOP = "HTTP: POST /search to the framework-free floor (request_floor.py), worker hop"
FLOOR_INLINE = "HTTP: POST /search to the framework-free floor, search on the event loop (no hop)"
CPU_IN = "CPU ms/request, in process"
CPU_SERVE = "CPU ms/request, compir serve + http.client"
CPU_FLOOR = "CPU ms/request, floor with hop + http.client"
AROUND = "= FastAPI + middleware + form + hops + JSON (app - decode - encoders/index)"
UVICORN = "= uvicorn + socket + client (HTTP http.client - app in process)"
HTTPX_EXTRA = "= httpx's extra cost per request (httpx - http.client)"
RATIO = "in process / HTTP http.client (ratio)"
RATIO_HTTPX = "in process / HTTP httpx (ratio)"
RATIO_FLOOR_HOP = "in process / floor with hop (ratio)"
RATIO_FLOOR_INLINE = "in process / floor without hop (ratio)"
CPU_RATIO = "CPU in process / CPU of compir serve + client (ratio: HTTP's ceiling once clients keep the cores busy)"


async def bare_app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
    """An ASGI app that answers every request with ``{}``: uvicorn's own cost, nothing else."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _median_ms(call: Callable[[], object], n: int) -> float:
    call()
    runs = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        runs.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(runs)


def _run_async(work: Callable[[], Awaitable[float]]) -> float:
    import uvloop

    loop = uvloop.new_event_loop()  # compir serve's loop (uvicorn_options)
    try:
        return loop.run_until_complete(work())
    finally:
        loop.close()


async def _median_ms_async(call: Callable[[], Awaitable[object]], n: int) -> float:
    await call()
    runs = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        runs.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(runs)


def _hop_ms(n: int) -> float:
    async def hops() -> float:
        from concurrent.futures import ThreadPoolExecutor

        loop, executor = asyncio.get_running_loop(), ThreadPoolExecutor(max_workers=4)
        try:
            return await _median_ms_async(lambda: loop.run_in_executor(executor, int), n)
        finally:
            executor.shutdown()

    return _run_async(hops)


def _asgi_ms(app: Any, method: str, path: str, request: EncodedRequest | None, n: int) -> float:
    """One request sent to ``app`` as uvicorn sends it (one body message), median ms; the answer must be 200."""
    body = request.body if request else b""
    headers = [(b"host", b"127.0.0.1")]
    if request is not None:
        headers += [(b"content-type", request.content_type.encode()), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def one() -> None:
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(scope), receive, send)
        if statuses != [200]:
            raise RuntimeError(f"{method} {path} in process answered {statuses}")

    return _run_async(lambda: _median_ms_async(one, n))


class _ChildServer:
    """An ASGI app (``module:attr``) under uvicorn with ``compir serve``'s settings, in a child process."""

    def __init__(self, target: str, *, factory: bool = False, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = ("import uvicorn; from compir.service.server import uvicorn_options; "
                f"uvicorn.run({target!r}, port={self.port}, factory={factory}, **uvicorn_options('warning'))")
        self.process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the uvicorn child exited with {self.process.returncode}")
            try:
                KeepAliveClient(self.url, timeout=1).get("/")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the uvicorn child did not start within {timeout:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _cpu_rows(prefix: str, pid: int, call: Callable[[], object], n: int) -> dict[str, float]:
    """:func:`cpu_per_call`'s split as rows named ``prefix: part``, and their total."""
    split = cpu_per_call(pid, call, n)
    rows = {f"{prefix}: {part}": ms for part, ms in split.items()}
    rows[f"{prefix}: total"] = sum(split.values())
    return rows


def _in_process(export: Path, index: Path, image: bytes, text: str, request: EncodedRequest, n: int) -> dict[str, float]:
    import orjson
    from fastapi.responses import Response
    from pydantic import TypeAdapter

    from compir.runtime.retriever import Retriever
    from compir.service.app import create_app
    from compir.service.config import BatchingConfig, ServiceConfig
    from compir.service.engine import ServiceEngine
    from compir.service.forms import parse_multipart
    from compir.service.inputs import decode_image
    from compir.service.schemas import HitOut, SearchOut

    retriever = Retriever.from_dirs(export, index, providers=["cpu"])
    limits = ServiceConfig().limits
    decoded = decode_image(image, limits, field="reference")
    hits = retriever.search(reference_image=image, text=text, k=10)
    adapter = TypeAdapter(SearchOut)

    def fastapi_json() -> Response:
        out = SearchOut(hits=[HitOut(item_id=h.item_id, score=h.score) for h in hits], timings_ms={"search": 1.0}, batch_size=1)
        return Response(adapter.dump_json(adapter.validate_python(out)), media_type="application/json")

    def orjson_json() -> Response:
        body = {"hits": [{"item_id": h.item_id, "score": h.score} for h in hits], "timings_ms": {"search": 1.0}, "batch_size": 1}
        return Response(orjson.dumps(body), media_type="application/json")

    figures = {
        IN_PROCESS: _median_ms(lambda: retriever.search_detailed(reference_image=image, text=text, k=10), n),
        DECODE: _median_ms(lambda: decode_image(image, limits, field="reference"), n),
        ENCODE: _median_ms(lambda: retriever.search_detailed(reference_image=decoded, text=text, k=10), n),
        PARSE: _median_ms(lambda: parse_multipart(request.body, request.content_type), n),
        HOP: _hop_ms(n),
        JSON_FASTAPI: _median_ms(fastapi_json, n),
        JSON_ORJSON: _median_ms(orjson_json, n),
    }
    figures.update(_cpu_rows(CPU_IN, os.getpid(), lambda: retriever.search_detailed(reference_image=image, text=text, k=10), n))
    app = create_app(ServiceEngine(retriever, config=ServiceConfig(batching=BatchingConfig(enabled=False))))
    figures[APP_SEARCH] = _asgi_ms(app, "POST", "/search", request, n)
    figures[APP_HEALTH] = _asgi_ms(app, "GET", "/health", None, n)
    return figures


def _over_http(export: Path, index: Path, files: dict[str, Any], data: dict[str, str], request: EncodedRequest,
               n: int, py_spy_s: float) -> tuple[dict[str, float], str]:
    import httpx

    figures: dict[str, float] = {}
    bare = _ChildServer("benchmarks.profile_request:bare_app")
    try:
        bare.wait_ready()
        client = KeepAliveClient(bare.url)
        figures[HTTP_BARE] = _median_ms(lambda: client.get("/"), n)
        client.close()
    finally:
        bare.stop()
    for hop, (row, cpu_row) in {True: (FLOOR_HOP, CPU_FLOOR), False: (FLOOR_INLINE, None)}.items():
        floor = _ChildServer("benchmarks.request_floor:floor_app", factory=True, env={
            "COMPIR_FLOOR_EXPORT": str(export), "COMPIR_FLOOR_INDEX": str(index), "COMPIR_FLOOR_HOP": "1" if hop else "0"})
        try:
            floor.wait_ready()
            floor_client = KeepAliveClient(floor.url)
            search = functools.partial(floor_client.post, "/search", request)
            figures[row] = _median_ms(search, n)
            if cpu_row is not None:
                figures.update(_cpu_rows(cpu_row, floor.process.pid, search, n))
            floor_client.close()
        finally:
            floor.stop()
    server = _Server(export, index, batching=False)  # the in-process retriever only reads: no writer lock taken
    hot = ""
    try:
        server.wait_ready()
        client = KeepAliveClient(server.url)
        figures[HTTP_HEALTH] = _median_ms(lambda: client.get("/health"), n)
        figures[HTTP_SEARCH] = _median_ms(lambda: client.post("/search", request), n)
        figures.update(_cpu_rows(CPU_SERVE, server.process.pid, lambda: client.post("/search", request), n))
        with httpx.Client(base_url=server.url, timeout=60) as session:
            figures[HTTP_HTTPX] = _median_ms(lambda: session.post("/search", files=files, data=data), n)
        if py_spy_s > 0:
            hot = _py_spy(server.process.pid, lambda: client.post("/search", request), seconds=py_spy_s)
        client.close()
    finally:
        server.stop()
    return figures, hot


def _py_spy(pid: int, call: Callable[[], object], *, seconds: float, top: int = 25) -> str:
    """py-spy's samples of process ``pid`` while one client calls ``call`` in a loop: the functions
    seen most often (own time, and on the stack at all), as a markdown table."""
    if shutil.which("py-spy") is None:
        return "(py-spy is not installed: pip install py-spy)"
    with tempfile.TemporaryDirectory(prefix="compir-py-spy-") as tmp:
        raw = Path(tmp) / "samples.txt"
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                call()

        driver = threading.Thread(target=load)
        driver.start()
        try:
            result = subprocess.run(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw",
                                     "--nonblocking", "--threads", "--output", str(raw)], capture_output=True, text=True, check=False)
        finally:
            done.set()
            driver.join()
        if result.returncode != 0 or not raw.exists():
            return f"(py-spy failed with {result.returncode}: {result.stderr.strip()[-300:]})"
        own: collections.Counter[str] = collections.Counter()
        anywhere: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = [_frame(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += int(count)
            own[frames[-1]] += int(count)
            for frame in set(frames):
                anywhere[frame] += int(count)
    rows = [[name, 100.0 * c / total, 100.0 * anywhere[name] / total] for name, c in own.most_common(top)]
    return f"py-spy, {total} busy samples of the server over {seconds:.0f} s:\n" + markdown_table(
        ["function (file)", "% own", "% on stack"], rows)


def _frame(raw: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``."""
    name, _, where = raw.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


def profile(root: Path, *, requests: int, py_spy_s: float = 0.0) -> tuple[dict[str, float], str]:
    """The split (ms per part, see the module docstring) and py-spy's table ("" without ``py_spy_s``)."""
    export, index, queries = _prepare(root, quick=True)
    image, text = queries[0]
    files, data = {"reference": ("ref.png", image, "image/png")}, {"text": text, "k": "10"}
    request = encode_multipart(files=files, data=data)
    figures = _in_process(export, index, image, text, request, requests)
    over_http, hot = _over_http(export, index, files, data, request, requests, py_spy_s)
    figures.update(over_http)
    figures[AROUND] = figures[APP_SEARCH] - figures[DECODE] - figures[ENCODE]
    figures[UVICORN] = figures[HTTP_SEARCH] - figures[APP_SEARCH]
    figures[HTTPX_EXTRA] = figures[HTTP_HTTPX] - figures[HTTP_SEARCH]
    figures[RATIO] = figures[IN_PROCESS] / figures[HTTP_SEARCH]
    figures[RATIO_HTTPX] = figures[IN_PROCESS] / figures[HTTP_HTTPX]
    figures[RATIO_FLOOR_HOP] = figures[IN_PROCESS] / figures[FLOOR_HOP]
    figures[RATIO_FLOOR_INLINE] = figures[IN_PROCESS] / figures[FLOOR_INLINE]
    figures[CPU_RATIO] = figures[f"{CPU_IN}: total"] / figures[f"{CPU_SERVE}: total"]
    return figures, hot


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_request", description=__doc__.splitlines()[0],
                                     epilog="examples:\n  python -m benchmarks.profile_request --requests 300\n"
                                            "  python -m benchmarks.profile_request --requests 100 --py-spy 10",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="calls per figure (median reported)")
    parser.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                        help="also sample the server with py-spy for this long under one client (default: off)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="compir-profile-request-") as tmp:
        figures, hot = profile(Path(tmp), requests=args.requests, py_spy_s=args.py_spy)
    print(json.dumps(figures))
    print(markdown_table(["part", "median ms (ratio for the last rows)"], [[name, round(v, 3)] for name, v in figures.items()]))
    if hot:
        print(hot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
