"""Start-up: time to ready, and the first request's latency against the 100th.

Three ways to open an export and its index, each in a fresh process (what is cold is cold once
per process):

- ``Retriever.from_dirs``: seconds from the interpreter's start to an open retriever (imports
  included), then 100 composed queries (an uploaded PNG + a text; the text cache off, so every
  query runs every stage);
- ``compir serve``: seconds from the command's start to ``GET /ready`` answering 200, then 100
  ``POST /search`` uploads over one keep-alive connection (opened by a ``GET /health`` first, so
  the first search does not pay the client's connect);
- ``compir demo``: seconds from the command's start to the page answering 200, and 100 calls of
  the function the page's search button calls (``DemoSession.search``) in a fresh process.

Models: the default (tiny, 32 px) and ViT-B-32 (224 px, random weights; left out by --quick).
Each start-up is repeated (--quick: once) and medians are reported.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_service import _copy, _free_port, _prepare, _Server
from benchmarks.common import BenchResult, Panel, bar_chart, markdown_table

NAME = "startup"
DESCRIPTION = "time to ready and first vs 100th request: Retriever.from_dirs, compir serve, compir demo (default model, ViT-B-32)"
REQUESTS = 100
MODES = ("Retriever.from_dirs", "compir serve", "compir demo")

# Run in a fresh interpreter: argv = export, index, queries.json (reference paths + texts); prints JSON.
_IN_PROCESS = """
import json, sys, time
started = time.perf_counter()
from pathlib import Path
export, index, queries, demo = sys.argv[1], sys.argv[2], json.loads(Path(sys.argv[3]).read_text()), sys.argv[4] == "demo"
if demo:
    from compir.demo.session import ActiveReference, DemoSession
    session = DemoSession(export, index)
else:
    from compir.runtime.retriever import Retriever
    retriever = Retriever.from_dirs(export, index, providers=["cpu"], text_cache_size=0)
ready = time.perf_counter() - started
ms = []
for n in range(int(sys.argv[5])):
    path, text = queries[n % len(queries)]
    start = time.perf_counter()
    if demo:  # what the page's search button runs; each text once, so the cache never answers
        session.search(reference=ActiveReference(kind="upload", path=path), text=f"{text} {n}", k=10)
    else:
        retriever.search(reference_image=Path(path).read_bytes(), text=text, k=10)
    ms.append((time.perf_counter() - start) * 1000.0)
print(json.dumps({"ready_s": ready, "ms": ms}))
"""


def prepare_vit(root: Path, tiny_root: Path) -> tuple[Path, Path]:
    """A random-weight ViT-B-32 exported (fp32) and an index of the tiny fixture's images; runs in a child process."""
    code = (
        "import torch; from pathlib import Path\n"
        "from compir.export.to_onnx import export_onnx\nfrom compir.runtime.build import build_index\n"
        "from compir.runtime.encoder import Encoder\nfrom compir.train.checkpoint import save_checkpoint\n"
        "from compir.train.config import resolve_model_config\nfrom compir.train.model import CIRModel\n"
        f"root, data = Path({str(root)!r}), Path({str(tiny_root / 'data')!r})\n"
        "torch.manual_seed(0)\n"
        "save_checkpoint(root / 'vit.pt', model=CIRModel(resolve_model_config('ViT-B-32')), metrics={}, step=0, epoch=0)\n"
        "export_onnx(root / 'vit.pt', out_dir=root / 'export', variants=('fp32',), calibration_count=4)\n"
        "build_index(Encoder.from_export(root / 'export', providers=['cpu']), images=data / 'images', out=root / 'index', progress=False)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"exporting ViT-B-32 failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return root / "export", root / "index"


def _summary(ready_s: float, ms: list[float]) -> dict[str, Any]:
    warm = statistics.median(ms[1:])
    return {"ready_s": ready_s, "first_ms": ms[0], "last_ms": ms[-1], "median_ms": warm, "first_over_median": ms[0] / warm}


def _in_process(export: Path, index: Path, queries: Path, *, demo: bool) -> dict[str, Any]:
    args = [sys.executable, "-c", _IN_PROCESS, str(export), str(index), str(queries), "demo" if demo else "retriever", str(REQUESTS)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the {'demo session' if demo else 'retriever'} run failed ({result.returncode}):\n{result.stderr[-2000:]}")
    record = json.loads(result.stdout.splitlines()[-1])
    return _summary(record["ready_s"], record["ms"])


def _serve(export: Path, index: Path, queries: list[tuple[str, str]]) -> dict[str, Any]:
    import httpx

    started = time.perf_counter()
    server = _Server(export, index, batching=False)
    try:
        server.wait_ready()
        ready = time.perf_counter() - started
        ms = []
        with httpx.Client(base_url=server.url, timeout=60) as client:
            client.get("/health")  # the connection: a client's cost, not the server's
            for n in range(REQUESTS):
                path, text = queries[n % len(queries)]
                start = time.perf_counter()
                response = client.post("/search", files={"reference": ("ref.png", Path(path).read_bytes(), "image/png")},
                                       data={"text": f"{text} {n}", "k": "10"})
                ms.append((time.perf_counter() - start) * 1000.0)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    finally:
        server.stop()
    return _summary(ready, ms)


def _demo_ready(export: Path, index: Path, timeout: float = 300.0) -> float:
    """Seconds from ``compir demo``'s start to its page answering 200."""
    import httpx

    port = _free_port()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "compir", "demo", str(export), str(index), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while time.perf_counter() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"compir demo exited with {process.returncode}: {process.communicate()[0][-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"compir demo not ready after {timeout:.0f} s")
    finally:
        process.terminate()
        process.communicate(timeout=30)


def _model(export: Path, index: Path, queries: list[tuple[str, str]], work: Path, *, starts: int) -> dict[str, dict[str, Any]]:
    listing = work / "queries.json"
    listing.write_text(json.dumps(queries))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for start in range(starts):  # modes take turns, so a change in the machine's load hits each alike
        runs[MODES[0]].append(_in_process(export, index, listing, demo=False))
        runs[MODES[1]].append(_serve(export, _copy(index, f"serve{start}"), queries))
        demo_index = _copy(index, f"demo{start}")
        record = _in_process(export, demo_index, listing, demo=True)
        runs[MODES[2]].append({**record, "ready_s": _demo_ready(export, demo_index)})
    return {mode: {key: statistics.median(r[key] for r in records) for key in records[0]} for mode, records in runs.items()}


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    starts = 1 if quick else 3
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="compir-bench-startup-") as tmp:
        root = Path(tmp)
        export, index, _ = _prepare(root / "tiny", quick=True)
        images = sorted((root / "tiny" / "data" / "images").iterdir())
        texts = ["make it red", "add a small blue square", "remove the circle", "move it to the left"]
        queries = [(str(path), texts[n % len(texts)]) for n, path in enumerate(images[:20])]
        results["default (tiny)"] = _model(export, index, queries, root / "tiny", starts=starts)
        if not quick:
            vit_export, vit_index = prepare_vit(root / "vit", root / "tiny")
            results["ViT-B-32"] = _model(vit_export, vit_index, queries, root / "vit", starts=starts)
    rows = [[model, mode, f"{r['ready_s']:.2f}", f"{r['first_ms']:.1f}", f"{r['last_ms']:.1f}", f"{r['median_ms']:.1f}",
             f"{r['first_over_median']:.2f}x"] for model, modes in results.items() for mode, r in modes.items()]
    table = markdown_table(["model", "opened by", "time to ready s", "1st request ms", f"{REQUESTS}th ms",
                            f"median 2-{REQUESTS} ms", "1st / median"], rows)
    plot = bar_chart(out_dir / "startup.png", panels=[
        Panel(f"{model}: request latency (lower is better)",
              {"1st": {m: r["first_ms"] for m, r in modes.items()}, f"{REQUESTS}th": {m: r["last_ms"] for m, r in modes.items()},
               "median": {m: r["median_ms"] for m, r in modes.items()}}, "ms")
        for model, modes in results.items()
    ])
    notes = (f"Medians of {starts} start(s) per mode, each in a fresh process; requests are composed queries with an uploaded "
             f"64 px PNG, one at a time. Time to ready includes the interpreter's imports.")
    return BenchResult(name=NAME, figures={"models": results, "starts": starts, "requests": REQUESTS}, table=table,
                       plots=(plot,), notes=notes)
