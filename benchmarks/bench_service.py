"""The HTTP API under load: requests/s and p50 / p99 latency at 1, 4 and 16 concurrent clients,
with and without dynamic batching, against calling the Python API in-process.

Setup: a small synthetic dataset, an untrained ``tiny`` model (throughput does not depend on the
weights) exported to ONNX fp32, an index of the dataset's images. Each request is a composed
query with an uploaded 64x64 PNG reference (decode + image encode + compose + search; query
texts repeat, so the runtime's text cache answers most text encodes, as it would in service).
The server is ``compir serve`` in its own process on 127.0.0.1; clients are threads with one
keep-alive httpx connection each. Every configuration runs ``repeats`` times, the modes taking
turns; the median run's figures are reported. Full: 16 clients x 100 requests per run; --quick: 96 requests per run.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchResult, Panel, bar_chart, markdown_table

NAME = "service"
DESCRIPTION = "HTTP API: requests/s and p50/p99 latency at 1/4/16 clients, dynamic batching on/off, vs the in-process Python API"
CONCURRENCY = (1, 4, 16)
MODES = ("python in-process", "http, batching off", "http, batching on")
K = 10


def prepare_files(root: Path, *, quick: bool) -> None:
    """Write data/, tiny.pt, export/ and index/ under ``root`` (runs in a child process: torch
    stays out of the process whose in-process baseline is measured)."""
    import torch

    from compir.data.synth import SynthConfig
    from compir.data.synth_write import write_synthetic
    from compir.export.to_onnx import export_onnx
    from compir.runtime.build import build_index
    from compir.runtime.encoder import Encoder
    from compir.train.checkpoint import save_checkpoint
    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    config = SynthConfig(n_train=100, n_val=40, n_test=120) if quick else SynthConfig(n_train=200, n_val=100, n_test=400)
    write_synthetic(root / "data", seed=0, config=config, workers=2)
    torch.manual_seed(0)
    save_checkpoint(root / "tiny.pt", model=CIRModel(resolve_model_config("tiny")), metrics={}, step=0, epoch=0)
    export_onnx(root / "tiny.pt", out_dir=root / "export", variants=("fp32",), calibration_data=root / "data", calibration_count=8)
    encoder = Encoder.from_export(root / "export", providers=["cpu"])
    build_index(encoder, images=root / "data" / "images", out=root / "index", progress=False)


def _prepare(root: Path, *, quick: bool) -> tuple[Path, Path, list[tuple[bytes, str]]]:
    """(export dir, index dir, [(reference PNG bytes, text)]) built from scratch under ``root``."""
    from compir.data.load import load_split

    code = (
        "from pathlib import Path; from benchmarks.bench_service import prepare_files; "
        f"prepare_files(Path({str(root)!r}), quick={quick})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"preparing the export and index failed ({result.returncode}):\n{result.stderr[-2000:]}")
    split = load_split(root / "data", split="test")
    queries = [(split.image_path(q.reference).read_bytes(), q.text) for q in split.queries]
    return root / "export", root / "index", queries


def _drive(clients: int, total: int, call: Callable[[int, int], None]) -> tuple[float, np.ndarray]:
    """Run ``total`` calls spread over ``clients`` threads; (wall seconds, per-call ms)."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = [total // clients + (1 if c < total % clients else 0) for c in range(clients)]
    errors: list[BaseException] = []

    def worker(client: int) -> None:
        mine = []
        try:
            for n in range(per_client[client]):
                start = time.perf_counter()
                call(client, n)
                mine.append((time.perf_counter() - start) * 1000.0)
        except BaseException as exc:  # surfaced after join: a benchmark must not hide a failure
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return wall, np.asarray(latencies)


def _summary(runs: Sequence[tuple[float, np.ndarray]], total: int) -> dict[str, Any]:
    # The median run by throughput, so rps and its latencies come from one run.
    ordered = sorted(runs, key=lambda run: run[0])
    wall, latencies = ordered[len(ordered) // 2]
    return {
        "rps": total / wall,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "rps_runs": [total / w for w, _ in runs],
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    """``compir serve`` in a child process (its return code and output are checked)."""

    def __init__(self, export: Path, index: Path, *, batching: bool) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "compir", "serve", str(export), str(index), "--port", str(self.port),
                   "--log-level", "warning", "--max-k", str(K)]
        command += ["--batching", "on" if batching else "off"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"compir serve exited with {self.process.returncode}: {self.stop()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"compir serve not ready after {timeout:.0f} s: {self.stop()}")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        output, _ = self.process.communicate(timeout=30)
        return output or ""


def _measure(export: Path, index: Path, queries: list[tuple[bytes, str]], *, total: int,
             repeats: int) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, Any]]:
    """{mode: {clients: figures}} and the batching server's batch counts.

    Both servers stay up and the modes take turns within each repeat, so a change in the
    machine's load (other processes) hits every mode alike instead of biasing one."""
    import httpx

    from compir.runtime.retriever import Retriever

    retriever = Retriever.from_dirs(export, index, providers=["cpu"])
    servers = {MODES[1]: _Server(export, index, batching=False), MODES[2]: _Server(export, index, batching=True)}
    results: dict[str, dict[int, dict[str, Any]]] = {mode: {} for mode in MODES}
    try:
        for server in servers.values():
            server.wait_ready()
        for clients in CONCURRENCY:
            sessions = {mode: [httpx.Client(base_url=s.url, timeout=60) for _ in range(clients)] for mode, s in servers.items()}
            calls = {MODES[0]: _python_call(retriever, queries)}
            calls.update({mode: _http_call(sessions[mode], queries) for mode in servers})
            runs: dict[str, list[tuple[float, np.ndarray]]] = {mode: [] for mode in MODES}
            for mode in MODES:
                _drive(clients, min(total, 4 * clients), calls[mode])  # warm-up: connections, caches
            for _ in range(repeats):
                for mode in MODES:
                    runs[mode].append(_drive(clients, total, calls[mode]))
            for mode in MODES:
                results[mode][clients] = _summary(runs[mode], total)
            for client in (c for group in sessions.values() for c in group):
                client.close()
        batch_stats = httpx.get(servers[MODES[2]].url + "/stats").json().get("batching_stats", {})
    finally:
        for server in servers.values():
            server.stop()
    return results, batch_stats


def _python_call(retriever: Any, queries: list[tuple[bytes, str]]) -> Callable[[int, int], None]:
    def call(client: int, n: int) -> None:
        image, text = queries[(client * 7919 + n) % len(queries)]
        retriever.search(reference=image, text=text, k=K)

    return call


def _http_call(sessions: list[Any], queries: list[tuple[bytes, str]]) -> Callable[[int, int], None]:
    def call(client: int, n: int) -> None:
        image, text = queries[(client * 7919 + n) % len(queries)]
        response = sessions[client].post("/search", files={"reference": ("ref.png", image, "image/png")},
                                         data={"text": text, "k": str(K)})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

    return call


def _batch_cost(export: Path, index: Path, queries: list[tuple[bytes, str]], *, repeats: int) -> dict[str, float]:
    """What dynamic batching can gain at most: 16 queries in one search_batch vs 16 searches."""
    from benchmarks.common import time_runs
    from compir.runtime.retriever import Retriever

    retriever = Retriever.from_dirs(export, index, providers=["cpu"])
    chosen = queries[:16]
    batch = time_runs(lambda: retriever.search_batch([{"reference": i, "text": t} for i, t in chosen], k=K), repeats=repeats)
    singles = time_runs(lambda: [retriever.search(reference=i, text=t, k=K) for i, t in chosen], repeats=repeats)
    return {"batch_of_16_ms": batch.median_s * 1000, "16_singles_ms": singles.median_s * 1000,
            "speedup": singles.median_s / batch.median_s}


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    total, repeats = (96, 3) if quick else (1600, 3)
    with tempfile.TemporaryDirectory(prefix="compir-bench-service-") as tmp:
        export, index, queries = _prepare(Path(tmp), quick=quick)
        batch_cost = _batch_cost(export, index, queries, repeats=5)
        by_mode, batch_stats = _measure(export, index, queries, total=total, repeats=repeats)
    rows = []
    for mode, results in by_mode.items():
        for clients, figures in results.items():
            baseline = by_mode[MODES[0]][clients]["rps"]
            rows.append([mode, clients, figures["rps"], figures["rps"] / baseline, figures["p50_ms"], figures["p99_ms"]])
    table = markdown_table(["mode", "clients", "requests/s", "vs in-process", "p50 ms", "p99 ms"], rows)
    label = {c: f"{c} client{'s' if c > 1 else ''}" for c in CONCURRENCY}
    plot = bar_chart(out_dir / "service.png", panels=[
        Panel("throughput", {m: {label[c]: f["rps"] for c, f in r.items()} for m, r in by_mode.items()}, "requests/s"),
        Panel("p99 latency", {m: {label[c]: f["p99_ms"] for c, f in r.items()} for m, r in by_mode.items()}, "ms"),
    ])
    notes = (
        f"{total} composed queries (uploaded 64x64 PNG + text, k={K}) per run, median of {repeats} runs (modes interleaved); "
        "server: `compir serve` in its own process (batching on: max 16, wait 2 ms), clients: threads in the "
        f"benchmark process on the same cores. Batches formed with batching on: {batch_stats}. "
        f"Upper bound of the gain: 16 queries in one Retriever.search_batch take {batch_cost['batch_of_16_ms']:.1f} ms, "
        f"16 single searches {batch_cost['16_singles_ms']:.1f} ms (x{batch_cost['speedup']:.2f}); "
        "`compir serve --batching auto` turns batching on only for GPU encoders. "
        "The model is an untrained `tiny` config: speed does not depend on the weights."
    )
    figures = {"requests_per_run": total, "repeats": repeats, "k": K,
               "results": {m: {str(c): f for c, f in r.items()} for m, r in by_mode.items()},
               "batching_stats": batch_stats, "batch_cost": batch_cost}
    return BenchResult(name=NAME, figures=figures, table=table, plots=(plot,), notes=notes)
