"""The HTTP API under load: requests/s and p50 / p99 latency at 1, 4 and 16 concurrent clients,
with and without dynamic batching, against calling the Python API in-process.

Setup: a small synthetic dataset, an untrained ``tiny`` model (throughput does not depend on the
weights) exported to ONNX fp32, an index of the dataset's images. Each request is a composed
query with an uploaded 64x64 PNG reference (decode + image encode + compose + search; query
texts repeat, so the runtime's text cache answers most text encodes, as it would in service).
The server is ``compir serve`` in its own process on 127.0.0.1 (and, with the ray extra installed,
``compir serve --ray --replicas 2``: a local Ray Serve app, 2 HTTP replicas and the gallery owner,
batching off as on a CPU by default); clients are threads with one
keep-alive httpx connection each. Every configuration runs ``repeats`` times, the modes taking
turns; the median run's figures are reported. Full: 16 clients x 100 requests per run; --quick: 96 requests per run.

Memory soak: a fresh ``compir serve`` (default batching: off on a CPU) answers SOAK_REQUESTS composed
uploads from 16 clients (20,000; --quick 2,000) with texts that keep changing (more than the text
cache holds), while the server's resident set size (Linux /proc) is sampled; it levels off when
the second half of the run adds at most LEVEL_MB_TOLERANCE (or 5 %) to the RSS at half-way.

Writes under load: a fresh server on a copy of the index takes ADDERS clients adding one image
each, one after another, while 0, 4 or 16 clients search; the add latency is from the request to
its acknowledgement, which comes once the add is on disk (group commit).
"""

from __future__ import annotations

import os
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

NAME = "service"
DESCRIPTION = ("HTTP API: requests/s and p50/p99 latency at 1/4/16 clients, dynamic batching on/off, Ray Serve (2 replicas), "
               "vs the in-process Python API; server RSS over a soak of 20,000 uploads; add p50/p95 under 0/4/16 searching clients")
CONCURRENCY = (1, 4, 16)
MODES = ("python in-process", "http, batching off", "http, batching on")
RAY_MODE = "ray serve, 2 replicas"
RAY_REPLICAS = 2
K = 10
SOAK_REQUESTS = {False: 20_000, True: 2_000}  # by quick
SOAK_CLIENTS = 16
SOAK_SAMPLES = 50
LEVEL_MB_TOLERANCE = 10.0
ADDERS = 2
ADDS = {False: 100, True: 20}  # per adder, by quick


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

    def __init__(self, export: Path, index: Path, *, batching: bool, ray: bool = False) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "compir", "serve", str(export), str(index), "--port", str(self.port),
                   "--log-level", "warning", "--max-k", str(K)]
        command += ["--batching", "on" if batching else "off"]
        if ray:
            command += ["--ray", "--replicas", str(RAY_REPLICAS)]
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
    """{mode: {clients: figures}} and the batching server's batch counts.

    Both servers stay up and the modes take turns within each repeat, so a change in the
    machine's load (other processes) hits every mode alike instead of biasing one."""
    import httpx

    from compir.runtime.retriever import Retriever

    retriever = Retriever.from_dirs(export, index, providers=["cpu"])
    # A server is its index's one writer (the writer lock): each gets its own copy of the same index.
    servers = {MODES[1]: _Server(export, _copy(index, "off"), batching=False),
               MODES[2]: _Server(export, _copy(index, "on"), batching=True)}
    if ray_available():
        servers[RAY_MODE] = _Server(export, _copy(index, "ray"), batching=False, ray=True)
    modes = [MODES[0], *servers]
    results: dict[str, dict[int, dict[str, Any]]] = {mode: {} for mode in modes}
    try:
        for server in servers.values():
            server.wait_ready()
        for clients in CONCURRENCY:
            sessions = {mode: [httpx.Client(base_url=s.url, timeout=60) for _ in range(clients)] for mode, s in servers.items()}
            calls = {MODES[0]: _python_call(retriever, queries)}
            calls.update({mode: _http_call(sessions[mode], queries) for mode in servers})
            runs: dict[str, list[tuple[float, np.ndarray]]] = {mode: [] for mode in modes}
            for mode in modes:
                _drive(clients, min(total, 4 * clients), calls[mode])  # warm-up: connections, caches
            for _ in range(repeats):
                for mode in modes:
                    runs[mode].append(_drive(clients, total, calls[mode]))
            for mode in modes:
                results[mode][clients] = _summary(runs[mode], total)
            for client in (c for group in sessions.values() for c in group):
                client.close()
        batch_stats = httpx.get(servers[MODES[2]].url + "/stats").json().get("batching_stats", {})
    finally:
        for server in servers.values():
            server.stop()
    return results, batch_stats


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


def _http_call(sessions: list[Any], queries: list[tuple[bytes, str]]) -> Callable[[int, int], None]:
    def call(client: int, n: int) -> None:
        image, text = queries[(client * 7919 + n) % len(queries)]
        response = sessions[client].post("/search", files={"reference": ("ref.png", image, "image/png")},
                                         data={"text": text, "k": str(K)})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

    return call


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (Linux: /proc/PID/statm, in pages)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except OSError as exc:
        raise RuntimeError(f"cannot read the RSS of process {pid} ({exc}); the soak needs Linux /proc") from exc
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(export: Path, index: Path, queries: list[tuple[bytes, str]], *, requests: int,
         clients: int = SOAK_CLIENTS, samples: int = SOAK_SAMPLES) -> dict[str, Any]:
    """``requests`` composed uploads against a fresh server, its RSS sampled every requests/samples
    answers: {"points": [(answered, seconds, rss MiB)], figures at start / half-way / end, "levels_off"}."""
    import httpx

    # 13 texts per reference: more distinct texts than the runtime's text cache (1024) keeps.
    varied = [(image, f"{text}, take {take}") for take in range(13) for image, text in queries]
    server = _Server(export, index, batching=False)
    sessions = [httpx.Client(base_url=server.url, timeout=60) for _ in range(clients)]
    try:
        server.wait_ready()
        pid = server.process.pid
        call = _http_call(sessions, varied)
        step = max(1, requests // samples)
        lock = threading.Lock()
        start = time.perf_counter()
        points = [(0, 0.0, rss_mb(pid))]
        answered = 0

        def counted(client: int, n: int) -> None:
            nonlocal answered
            call(client, n)
            with lock:
                answered += 1
                if answered % step == 0:
                    points.append((answered, time.perf_counter() - start, rss_mb(pid)))

        wall, latencies = _drive(clients, requests, counted)
    finally:
        for session in sessions:
            session.close()
        server.stop()
    half = min(points, key=lambda p: abs(p[0] - requests / 2))[2]
    end, peak = points[-1][2], max(p[2] for p in points)
    return {
        "requests": requests, "clients": clients, "rps": requests / wall, "p99_ms": float(np.percentile(latencies, 99)),
        "rss_start_mb": points[0][2], "rss_half_mb": half, "rss_end_mb": end, "rss_peak_mb": peak,
        "second_half_growth_mb": end - half,
        "levels_off": end - half <= max(LEVEL_MB_TOLERANCE, 0.05 * half),
        "points": points,
    }


def add_latency(export: Path, index: Path, queries: list[tuple[bytes, str]], *, searchers: int, adds: int) -> dict[str, Any]:
    """Add p50 / p95 (ms) with ``searchers`` clients searching all along, on a copy of ``index``."""
    import httpx

    copy = _copy(index, f"adds-{searchers}")
    server = _Server(export, copy, batching=False)
    done = threading.Event()
    search_ms: list[float] = []
    try:
        server.wait_ready()

        def search_forever(client: int) -> None:
            with httpx.Client(base_url=server.url, timeout=120) as session:
                call = _http_call([session], queries)
                for n in range(10**9):
                    if done.is_set():
                        return
                    start = time.perf_counter()
                    call(0, client * 7919 + n)
                    search_ms.append((time.perf_counter() - start) * 1000.0)

        background = [threading.Thread(target=search_forever, args=(c,), daemon=True) for c in range(searchers)]
        for thread in background:
            thread.start()
        adders = [httpx.Client(base_url=server.url, timeout=120) for _ in range(ADDERS)]

        def add(client: int, n: int) -> None:
            image = queries[(client * 31 + n) % len(queries)][0]
            response = adders[client].post("/gallery/items", files=[("files", (f"bench-{client}-{n}.png", image, "image/png"))])
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

        _, latencies = _drive(ADDERS, ADDERS * adds, add)
        done.set()
        for thread in background:
            thread.join(120)
    finally:
        done.set()
        server.stop()
        shutil.rmtree(copy, ignore_errors=True)
    return {"searchers": searchers, "adds": ADDERS * adds, "add_p50_ms": float(np.percentile(latencies, 50)),
            "add_p95_ms": float(np.percentile(latencies, 95)),
            "search_p50_ms": float(np.percentile(search_ms, 50)) if search_ms else float("nan")}


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
    total, repeats = (96, 3) if quick else (1600, 3)
    with tempfile.TemporaryDirectory(prefix="compir-bench-service-") as tmp:
        export, index, queries = _prepare(Path(tmp), quick=quick)
        batch_cost = _batch_cost(export, index, queries, repeats=5)
        by_mode, batch_stats = _measure(export, index, queries, total=total, repeats=repeats)
        memory = soak(export, index, queries, requests=SOAK_REQUESTS[quick])
        writes = [add_latency(export, index, queries, searchers=n, adds=ADDS[quick]) for n in (0, *CONCURRENCY[1:])]
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
        f"benchmark process on the same cores. Batches formed with batching on: {batch_stats}. "
        f"Upper bound of the gain: 16 queries in one Retriever.search_batch take {batch_cost['batch_of_16_ms']:.1f} ms, "
        f"16 single searches {batch_cost['16_singles_ms']:.1f} ms (x{batch_cost['speedup']:.2f}); "
        "`compir serve --batching auto` turns batching on only for GPU encoders. "
        "The model is an untrained `tiny` config: speed does not depend on the weights. "
        f"Memory soak: {memory['requests']:,} composed uploads from {SOAK_CLIENTS} clients against a fresh server "
        f"(batching off, {memory['rps']:.0f} requests/s), RSS sampled {SOAK_SAMPLES} times: "
        f"{memory['rss_start_mb']:.0f} MiB ready, {memory['rss_half_mb']:.0f} half-way, {memory['rss_end_mb']:.0f} at the end. "
        f"Writes: {ADDERS} clients add one image per request (acknowledged once on disk) while others search."
    )
    if RAY_MODE in by_mode:
        ratios = ", ".join(f"{c} client{'s' if c > 1 else ''} x{by_mode[RAY_MODE][c]['rps'] / by_mode[MODES[1]][c]['rps']:.2f}"
                           for c in CONCURRENCY)
        notes += (f" Ray Serve: `compir serve --ray --replicas {RAY_REPLICAS}` (a local Ray started by the command; "
                  f"{RAY_REPLICAS} HTTP replicas with their own encoders, one gallery-owner actor for the index; batching off), "
                  f"requests/s against `compir serve` with batching off: {ratios}. Its replicas share this machine's cores "
                  "with each other and with the clients, so here they measure Serve's overhead (proxy hop, owner calls), "
                  "not the scaling that replicas on separate machines give.")
    else:
        notes += ' Ray Serve rows skipped: the ray extra is not installed (pip install "compir[ray]").'
    figures = {"requests_per_run": total, "repeats": repeats, "k": K,
               "results": {m: {str(c): f for c, f in r.items()} for m, r in by_mode.items()},
               "batching_stats": batch_stats, "batch_cost": batch_cost, "memory_soak": memory, "writes": writes}
    return BenchResult(name=NAME, figures=figures, table=table, plots=(plot, rss_plot), notes=notes)
