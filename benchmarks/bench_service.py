"""The HTTP API under load: requests/s and p50 / p99 latency at 1, 4 and 16 concurrent clients,
with and without dynamic batching, against calling the Python API in-process.

Setup: a small synthetic dataset, an untrained ``tiny`` model (throughput does not depend on the
weights) exported to ONNX fp32, an index of the dataset's images. Each request is a composed
query with an uploaded 64x64 PNG reference (decode + image encode + compose + search; query
texts repeat, so the runtime's text cache answers most text encodes, as it would in service).
The server is ``compir serve`` in its own process on 127.0.0.1 (and, with the ray extra installed,
``compir serve --ray --replicas 1`` and ``--replicas 2``: a local Ray Serve app, its HTTP replicas and
the gallery owner, batching off as on a CPU by default). Clients are threads of this process, each
with one keep-alive ``http.client`` connection sending a request body encoded once up front
(:mod:`benchmarks.http_client`): a tenth of httpx's per-request work, so the client, which shares the
cores with the server, costs the server as little as a Python client can. In-process calls get the
same queries in the same order. Every configuration runs ``repeats`` times, the modes taking turns;
the median run's figures are reported. The Ray Serve apps run one at a time, each beside its own
in-process runs (its "vs in-process" is against those). Full: 16 clients x 100 requests per run;
--quick: 96 requests per run.

Memory soak: a fresh ``compir serve`` (default batching: off on a CPU) answers SOAK_REQUESTS composed
uploads from 16 clients (20,000; --quick 2,000) with texts that keep changing (more than the text
cache holds), while the server's resident set size (Linux /proc) is sampled; it levels off when
the second half of the run adds at most LEVEL_MB_TOLERANCE (or 5 %) to the RSS at half-way.

Writes under load: a fresh server on a copy of the index takes ADDERS clients adding one image
each, one after another, while 0, 4 or 16 clients search; the add latency is from the request to
its acknowledgement, which comes once the add is on disk (group commit).
"""

from __future__ import annotations

import json
import shutil
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

from benchmarks.common import BenchResult, Panel, bar_chart, line_chart, markdown_table
from benchmarks.http_client import EncodedRequest, KeepAliveClient, encode_multipart

NAME = "service"
DESCRIPTION = ("HTTP API: requests/s and p50/p99 latency at 1/4/16 clients, dynamic batching on/off, Ray Serve (1 and 2 replicas), "
               "vs the in-process Python API; server RSS over a soak of 20,000 uploads; add p50/p95 under 0/4/16 searching clients")
CONCURRENCY = (1, 4, 16)
MODES = ("python in-process", "http, batching off", "http, batching on")
RAY_MODES = {"ray serve, 1 replica": 1, "ray serve, 2 replicas": 2}  # mode: replicas
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

    def __init__(self, export: Path, index: Path, *, batching: bool, replicas: int | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "compir", "serve", str(export), str(index), "--port", str(self.port),
                   "--log-level", "warning", "--max-k", str(K)]
        command += ["--batching", "on" if batching else "off"]
        if replicas is not None:  # on Ray Serve
            command += ["--ray", "--replicas", str(replicas)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 240.0) -> None:
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
    """{mode: {clients: figures}} (each with "vs_in_process"), and {"batching_stats": the batching
    server's batch counts, "ray_failures": {mode: why its Ray Serve app did not start}}.

    The two ``compir serve`` stay up together and take turns with the in-process runs; each Ray
    Serve app then runs alone beside in-process runs of its own (one local Ray at a time)."""
    from compir.runtime.retriever import Retriever

    retriever = Retriever.from_dirs(export, index, providers=["cpu"])
    requests = _encoded(queries)
    # A server is its index's one writer (the writer lock): each gets its own copy of the same index.
    servers = {MODES[1]: _Server(export, _copy(index, "off"), batching=False),
               MODES[2]: _Server(export, _copy(index, "on"), batching=True)}
    results, stats = _turns(retriever, queries, requests, servers, total=total, repeats=repeats)
    ray_failures: dict[str, str] = {}
    for mode, replicas in RAY_MODES.items() if ray_available() else ():
        ray = {mode: _Server(export, _copy(index, f"ray-{replicas}"), batching=False, replicas=replicas)}
        try:
            results[mode] = _turns(retriever, queries, requests, ray, total=total, repeats=repeats)[0][mode]
        except RuntimeError as exc:  # a local Ray that cannot start here (an overloaded machine): reported in the notes
            ray_failures[mode] = str(exc).strip().splitlines()[-1][:300]
    return results, {"batching_stats": stats.get(MODES[2], {}), "ray_failures": ray_failures}


def _turns(retriever: Any, queries: list[tuple[bytes, str]], requests: list[EncodedRequest], servers: dict[str, _Server], *,
           total: int, repeats: int) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, Any]]:
    """The in-process mode and each server's, taking turns within each repeat so that a change in
    the machine's load (other processes) hits every mode alike; then the servers are stopped.
    ({mode: {clients: figures}}, {mode: the batching_stats of its /stats})."""
    modes = [MODES[0], *servers]
    results: dict[str, dict[int, dict[str, Any]]] = {mode: {} for mode in modes}
    try:
        for server in servers.values():
            server.wait_ready()
        for clients in CONCURRENCY:
            sessions = {mode: [KeepAliveClient(s.url) for _ in range(clients)] for mode, s in servers.items()}
            calls = {MODES[0]: _python_call(retriever, queries)}
            calls.update({mode: _http_call(sessions[mode], requests) for mode in servers})
            runs: dict[str, list[tuple[float, np.ndarray]]] = {mode: [] for mode in modes}
            for mode in modes:
                _drive(clients, min(total, 4 * clients), calls[mode])  # warm-up: connections, caches
            for _ in range(repeats):
                for mode in modes:
                    runs[mode].append(_drive(clients, total, calls[mode]))
            for mode in modes:
                results[mode][clients] = _summary(runs[mode], total)
                results[mode][clients]["vs_in_process"] = results[mode][clients]["rps"] / results[MODES[0]][clients]["rps"]
            for client in (c for group in sessions.values() for c in group):
                client.close()
        stats = {mode: json.loads(KeepAliveClient(s.url).get("/stats")[1]).get("batching_stats", {}) for mode, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    return results, stats


def _encoded(queries: list[tuple[bytes, str]]) -> list[EncodedRequest]:
    """Each query's POST /search body: its PNG as the reference upload, its text, k."""
    return [encode_multipart(files={"reference": ("ref.png", image, "image/png")}, data={"text": text, "k": str(K)})
            for image, text in queries]


def _copy(index: Path, name: str) -> Path:
    """A copy of ``index`` beside it (``<index>-<name>``), for a server of its own."""
    target = index.with_name(f"{index.name}-{name}")
    shutil.copytree(index, target, ignore=shutil.ignore_patterns(".compir.lock"))
    return target


def ray_available() -> bool:
    """Whether the ``ray`` extra (Ray Serve) is installed, so the Ray Serve rows can run."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None


def _python_call(retriever: Any, queries: list[tuple[bytes, str]]) -> Callable[[int, int], None]:
    def call(client: int, n: int) -> None:
        image, text = queries[(client * 7919 + n) % len(queries)]
        retriever.search(reference_image=image, text=text, k=K)

    return call


def _http_call(sessions: list[KeepAliveClient], requests: list[EncodedRequest]) -> Callable[[int, int], None]:
    def call(client: int, n: int) -> None:
        status, body = sessions[client].post("/search", requests[(client * 7919 + n) % len(requests)])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")

    return call


def _batch_cost(export: Path, index: Path, queries: list[tuple[bytes, str]], *, repeats: int) -> dict[str, float]:
    """What dynamic batching can gain at most: 16 queries in one search_batch vs 16 searches."""
    from benchmarks.common import time_runs
    from compir.runtime.retriever import Retriever

    retriever = Retriever.from_dirs(export, index, providers=["cpu"])
    chosen = queries[:16]
    batch = time_runs(lambda: retriever.search_batch([{"reference_image": i, "text": t} for i, t in chosen], k=K), repeats=repeats)
    singles = time_runs(lambda: [retriever.search(reference_image=i, text=t, k=K) for i, t in chosen], repeats=repeats)
    return {"batch_of_16_ms": batch.median_s * 1000, "16_singles_ms": singles.median_s * 1000,
            "speedup": singles.median_s / batch.median_s}


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    from benchmarks.service_soak import ADDERS, ADDS, SOAK_CLIENTS, SOAK_REQUESTS, SOAK_SAMPLES, add_latency, soak

    total, repeats = (96, 3) if quick else (1600, 3)
    with tempfile.TemporaryDirectory(prefix="compir-bench-service-") as tmp:
        export, index, queries = _prepare(Path(tmp), quick=quick)
        batch_cost = _batch_cost(export, index, queries, repeats=5)
        by_mode, measured = _measure(export, index, queries, total=total, repeats=repeats)
        memory = soak(export, index, queries, requests=SOAK_REQUESTS[quick])
        writes = [add_latency(export, index, queries, searchers=n, adds=ADDS[quick]) for n in (0, *CONCURRENCY[1:])]
    batch_stats = measured["batching_stats"]
    rows = [[mode, clients, f["rps"], f["vs_in_process"], f["p50_ms"], f["p99_ms"]]
            for mode, results in by_mode.items() for clients, f in results.items()]
    table = markdown_table(["mode", "clients", "requests/s", "vs in-process", "p50 ms", "p99 ms"], rows)
    label = {c: f"{c} client{'s' if c > 1 else ''}" for c in CONCURRENCY}
    plot = bar_chart(out_dir / "service.png", panels=[
        Panel("throughput", {m: {label[c]: f["rps"] for c, f in r.items()} for m, r in by_mode.items()}, "requests/s"),
        Panel("p99 latency", {m: {label[c]: f["p99_ms"] for c, f in r.items()} for m, r in by_mode.items()}, "ms"),
    ])
    rss_plot = line_chart(out_dir / "service_rss.png", title=f"server RSS over {memory['requests']:,} uploads ({SOAK_CLIENTS} clients)",
                          series={"compir serve": ([p[0] for p in memory["points"]], [p[2] for p in memory["points"]])},
                          xlabel="requests answered", ylabel="RSS (MiB)")
    table += "\n\n" + markdown_table(
        ["soak requests", "RSS start MiB", "half-way", "end", "peak", "2nd-half growth MiB", "levels off"],
        [[memory["requests"], memory["rss_start_mb"], memory["rss_half_mb"], memory["rss_end_mb"], memory["rss_peak_mb"],
          memory["second_half_growth_mb"], "yes" if memory["levels_off"] else "NO"]])
    table += "\n\n" + markdown_table(
        ["searching clients", "adds", "add p50 ms", "add p95 ms", "search p50 ms meanwhile"],
        [[w["searchers"], w["adds"], w["add_p50_ms"], w["add_p95_ms"], w["search_p50_ms"]] for w in writes])
    notes = (
        f"{total} composed queries (uploaded 64x64 PNG + text, k={K}) per run, median of {repeats} runs (modes interleaved); "
        "server: `compir serve` in its own process (batching on: max 16, wait 2 ms), clients: threads in the "
        "benchmark process on the same cores, one keep-alive http.client connection each, bodies encoded up front. "
        f"Batches formed with batching on: {batch_stats}. "
        f"Upper bound of the gain: 16 queries in one Retriever.search_batch take {batch_cost['batch_of_16_ms']:.1f} ms, "
        f"16 single searches {batch_cost['16_singles_ms']:.1f} ms (x{batch_cost['speedup']:.2f}); "
        "`compir serve --batching auto` turns batching on only for GPU encoders. "
        "The model is an untrained `tiny` config: speed does not depend on the weights. "
        f"Memory soak: {memory['requests']:,} composed uploads from {SOAK_CLIENTS} clients against a fresh server "
        f"(batching off, {memory['rps']:.0f} requests/s), RSS sampled {SOAK_SAMPLES} times: "
        f"{memory['rss_start_mb']:.0f} MiB ready, {memory['rss_half_mb']:.0f} half-way, {memory['rss_end_mb']:.0f} at the end. "
        f"Writes: {ADDERS} clients add one image per request (acknowledged once on disk) while others search."
    )
    if any(mode in by_mode for mode in RAY_MODES):
        notes += (" Ray Serve: `compir serve --ray --replicas 1` and `--replicas 2` (a local Ray started by the command; "
                  "HTTP replicas with their own encoders, one gallery-owner actor for the index; batching off), each app "
                  "alone, its 'vs in-process' against in-process runs taking turns with it. Its replicas share this machine's "
                  "cores with each other and with the clients, so here they measure Serve's overhead (proxy hop, owner calls), "
                  "not the scaling that replicas on separate machines give.")
    if not ray_available():
        notes += ' Ray Serve rows skipped: the ray extra is not installed (pip install "compir[ray]").'
    for mode, why in measured["ray_failures"].items():
        notes += f" {mode}: NOT MEASURED, its Ray did not start ({why})."
    figures = {"requests_per_run": total, "repeats": repeats, "k": K,
               "results": {m: {str(c): f for c, f in r.items()} for m, r in by_mode.items()},
               "batching_stats": batch_stats, "batch_cost": batch_cost, "memory_soak": memory, "writes": writes}
    return BenchResult(name=NAME, figures=figures, table=table, plots=(plot, rss_plot), notes=notes)
