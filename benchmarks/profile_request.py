"""Where one composed HTTP request's time goes: ``python -m benchmarks.profile_request [--requests N]``.

Builds the tiny export and index of ``compir bench service --quick`` in a temporary folder, then
times, each as the median of N (default 300) one-at-a-time calls:

- ``POST /search`` to ``compir serve`` (a child process; batching off; one keep-alive client), and
  ``GET /health`` (uvicorn, the middleware and a route doing nothing: the floor of any request);
- the same query in process (``Retriever.search_detailed``: decode + encoders + index), and the
  image decode alone (``decode_image``, the service's own check + decode);
- the service's strict multipart parser on the very body the client sends (``parse_multipart``);
- one hop from the event loop to a worker thread and back (``run_in_executor`` of a no-op; a
  search takes two: decode, then the search);
- the response's encoding (FastAPI's ``jsonable_encoder`` + ``JSONResponse`` of a ``SearchOut``
  with 10 hits).

"HTTP, unexplained" is what is left: FastAPI's dependency resolution and validation, httpx on the
client side, and the scheduling of two processes on the cores. Prints one JSON object and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.bench_service import _prepare, _Server
from benchmarks.common import markdown_table


def _median_ms(call: Callable[[], object], n: int) -> float:
    call()
    runs = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        runs.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(runs)


def _hop_ms(n: int) -> float:
    """One event loop -> worker thread -> event loop round trip, as ``in_executor`` makes it."""
    async def hops() -> float:
        loop, executor = asyncio.get_running_loop(), ThreadPoolExecutor(max_workers=4)
        await loop.run_in_executor(executor, int)
        runs = []
        for _ in range(n):
            start = time.perf_counter()
            await loop.run_in_executor(executor, int)
            runs.append((time.perf_counter() - start) * 1000.0)
        executor.shutdown()
        return statistics.median(runs)

    return asyncio.run(hops())


def profile(root: Path, *, requests: int) -> dict[str, float]:
    import httpx
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse

    from compir.runtime.retriever import Retriever
    from compir.service.config import Limits
    from compir.service.forms import parse_multipart
    from compir.service.inputs import decode_image
    from compir.service.schemas import HitOut, SearchOut

    export, index, queries = _prepare(root, quick=True)
    image, text = queries[0]
    files, data = {"reference": ("ref.png", image, "image/png")}, {"text": text, "k": "10"}
    built = httpx.Client().build_request("POST", "http://x/search", files=files, data=data)
    body, content_type = built.read(), built.headers["content-type"]
    retriever = Retriever.from_dirs(export, index, providers=["cpu"])
    hits = retriever.search(reference_image=image, text=text, k=10)
    out = SearchOut(hits=[HitOut(item_id=h.item_id, score=h.score) for h in hits], timings_ms={"search": 1.0}, batch_size=1)
    figures = {
        "in process: search_detailed (decode + encoders + index)": _median_ms(
            lambda: retriever.search_detailed(reference_image=image, text=text, k=10), requests),
        "of which: decode_image": _median_ms(lambda: decode_image(image, Limits(), field="reference"), requests),
        "multipart parse (parse_multipart)": _median_ms(lambda: parse_multipart(body, content_type), requests),
        "one thread hop (x2 per search)": _hop_ms(requests),
        "JSON encoding (jsonable_encoder + JSONResponse)": _median_ms(lambda: JSONResponse(jsonable_encoder(out)), requests),
    }
    server = _Server(export, index, batching=False)  # the in-process retriever only reads: no writer lock taken
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            figures["HTTP: GET /health (uvicorn + middleware + empty route)"] = _median_ms(lambda: client.get("/health"), requests)
            figures["HTTP: POST /search"] = _median_ms(lambda: client.post("/search", files=files, data=data), requests)
    finally:
        server.stop()
    explained = (figures["in process: search_detailed (decode + encoders + index)"] + figures["multipart parse (parse_multipart)"]
                 + 2 * figures["one thread hop (x2 per search)"] + figures["JSON encoding (jsonable_encoder + JSONResponse)"]
                 + figures["HTTP: GET /health (uvicorn + middleware + empty route)"])
    figures["HTTP, unexplained (FastAPI, validation, httpx, scheduling)"] = figures["HTTP: POST /search"] - explained
    figures["in process / HTTP"] = figures["in process: search_detailed (decode + encoders + index)"] / figures["HTTP: POST /search"]
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_request", description=__doc__.splitlines()[0],
                                     epilog="example:\n  python -m benchmarks.profile_request --requests 300",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="calls per figure (median reported)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="compir-profile-request-") as tmp:
        figures = profile(Path(tmp), requests=args.requests)
    print(json.dumps(figures))
    print(markdown_table(["part", "median ms (ratio for the last row)"], [[name, round(v, 3)] for name, v in figures.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
