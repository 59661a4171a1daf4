"""Composed-query encoding on the CPU: torch eager against onnxruntime fp32 / fp16 / int8.

One model, one export, the same inputs (reference images + modification texts of the synthetic
test split) for every backend:

- latency: one composed query (batch 1: reference image + text -> query vector), median ms,
  through the fused ``query_encoder`` graph;
- user query: the full query the runtime serves for an uploaded reference, through
  :class:`~compir.runtime.retriever.Retriever` (decode + numpy preprocess + tokenize + image
  encoder + text encoder + composer + index search, text cache off), against the same steps in
  torch eager (decode + torch transform + open_clip tokenizer + ``encode_query`` + top-k);
- throughput: batches of 32 queries, queries/s at the median batch time;
- recall: R@10 (and R@1) of each backend on the synthetic test split, and its drop vs torch; the
  ONNX variants' recall is the manifest's, measured through the runtime at export time.

Runs are interleaved (one call of each backend per round) so that load from other processes on
a shared machine hits every backend alike; torch and onnxruntime get the same thread count, at
1 thread (the robust comparison: torch's OpenMP barriers stall when other processes hold the
cores) and at all usable cores.
Goals: onnxruntime fp32 >= 2x torch at batch 1; int8 >= 3x with an R@10 drop <= 0.5 points; the
runtime's own user query (fp32) >= 2x torch eager at batch 1.

The model: ``COMPIR_BENCH_CHECKPOINT`` (+ ``COMPIR_BENCH_DATA``, its synthetic dataset) when set;
otherwise compir train's default model (``tiny-tgcir``) trained here on a fresh synthetic dataset.
Full: 400 training steps (at most 15 minutes), 1,000 test queries, 60 rounds;
--quick: 60 steps (at most 3 minutes), 400 test queries, 15 rounds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchResult, Panel, bar_chart, markdown_table

NAME = "export"
DESCRIPTION = "composed-query latency (batch 1) / throughput (batch 32) and recall: torch eager vs onnxruntime fp32/fp16/int8"
BACKENDS = ("torch", "fp32", "fp16", "int8-dynamic", "int8-static")
THROUGHPUT_BATCH = 32


def _model_and_data(work: Path, *, quick: bool) -> tuple[Path, Path, dict[str, Any]]:
    checkpoint = os.environ.get("COMPIR_BENCH_CHECKPOINT")
    data = os.environ.get("COMPIR_BENCH_DATA")
    if checkpoint and data:
        return Path(checkpoint), Path(data), {"source": "COMPIR_BENCH_CHECKPOINT"}
    from compir.data.synth import SynthConfig
    from compir.data.synth_write import write_synthetic
    from compir.train.config import DEFAULT_MODEL
    from compir.train.loop import TrainOptions, train

    data_dir = work / "synth"
    config = SynthConfig(n_train=2_000, n_val=200, n_test=400) if quick else SynthConfig(n_train=20_000, n_val=400, n_test=1_000)
    write_synthetic(data_dir, seed=0, config=config, workers=1)
    # A step budget (capped in minutes): recall differences between variants are only
    # meaningful once the model ranks with margins, which a few dozen steps do not give.
    steps, minutes = (60, 3.0) if quick else (400, 15.0)
    options = TrainOptions(
        data=data_dir, out_dir=work / "run", model=DEFAULT_MODEL, epochs=1, steps_per_epoch=steps, minutes=minutes, batch_size=64,
        progress=False,
    )
    result = train(options)
    provenance = {
        "source": f"{DEFAULT_MODEL} trained here ({result.steps} steps, {result.seconds / 60:.1f} min)",
        "train_steps": result.steps,
        "val": result.best_metrics,
    }
    return result.best_checkpoint, data_dir, provenance


def _query_inputs(split: Any, preprocess: Any, context_length: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    from compir.export.samples import pixels
    from compir.train.text import tokenize  # the benchmarked default model uses CLIP BPE

    queries = split.queries[:count]
    return (
        pixels([split.image_path(q.reference) for q in queries], preprocess=preprocess),
        tokenize([q.text for q in queries], context_length=context_length).numpy(),
    )


def _upload_queries(split: Any, count: int) -> list[tuple[bytes, str]]:
    """(reference image file bytes, text) of the first ``count`` queries: what a user uploads."""
    return [(split.image_path(q.reference).read_bytes(), q.text) for q in split.queries[:count]]


def _user_query(retriever: Any, uploads: list[tuple[bytes, str]]) -> Callable[[], object]:
    """Each call searches the next upload (reference image bytes + text) through ``retriever``."""
    turn = iter(range(1 << 30))

    def call() -> object:
        data, text = uploads[next(turn) % len(uploads)]
        return retriever.search(reference_image=data, text=text, k=10)

    return call


def _runtime_retrievers(export_dir: Path, gallery_embeds: np.ndarray, names: list[str], *, threads: int) -> dict[str, Any]:
    """One Retriever per ONNX variant, text cache off (every query encodes its text), searching a
    gallery of ``gallery_embeds`` (what it holds changes the hits, not the time a search takes)."""
    from compir.manifest import load_manifest
    from compir.runtime.backends.ort import OrtBackend
    from compir.runtime.encoder import Encoder
    from compir.runtime.gallery import Gallery
    from compir.runtime.retriever import Retriever

    manifest = load_manifest(export_dir)
    retrievers = {}
    for name in BACKENDS[1:]:
        backend = OrtBackend(export_dir, providers=["cpu"], threads=threads, spinning=threads == 1)
        encoder = Encoder(export_dir, manifest, backend, variant=name)
        gallery = Gallery(encoder=encoder.fingerprint, ndim=encoder.embed_dim, feature_shape=encoder.feature_shape)
        features = np.zeros((len(names), *encoder.feature_shape), np.float32)
        gallery.add(names, embeds=gallery_embeds, features=features, paths=[""] * len(names))
        encoder.warmup()
        retrievers[name] = Retriever(encoder, gallery, text_cache_size=0)
    return retrievers


def _ort_call(session: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(["query_embeds"], feeds)


def _interleaved(calls: dict[str, Callable[[], object]], *, rounds: int) -> dict[str, float]:
    """Median seconds per call of each backend; one call of each per round, after a warm-up."""
    for call in calls.values():
        call()
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            runs[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in runs.items()}


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    import torch

    from compir.data.load import load_split
    from compir.export.parity import open_session
    from compir.export.to_onnx import export_onnx
    from compir.images import load_image
    from compir.metrics import evaluate_split
    from compir.train.checkpoint import load_checkpoint
    from compir.train.evaluation import encode_split
    from compir.train.text import tokenize
    from compir.train.transforms import eval_transform

    work = out_dir / "export-work"
    checkpoint, data, provenance = _model_and_data(work, quick=quick)
    export_dir = work / "export"
    started = time.perf_counter()
    manifest = export_onnx(
        checkpoint, out_dir=export_dir, variants=BACKENDS[1:], calibration_data=data, eval_data=data, eval_split="test", overwrite=True
    )
    export_seconds = time.perf_counter() - started

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    split = load_split(data, split="test")
    context = manifest.tokenizer.context_length
    px, ids = _query_inputs(split, manifest.preprocess, context, THROUGHPUT_BATCH)
    rounds = 15 if quick else 60

    def calls(batch: int, sessions: dict[str, Any]) -> dict[str, Callable[[], object]]:
        feeds = {"pixel_values": px[:batch], "input_ids": ids[:batch]}
        pt, it = torch.from_numpy(feeds["pixel_values"]), torch.from_numpy(feeds["input_ids"])

        def eager() -> object:
            with torch.inference_mode():
                return model.encode_query(pt, it)

        table: dict[str, Callable[[], object]] = {"torch": eager}
        for name, session in sessions.items():
            table[name] = _ort_call(session, feeds)
        return table

    uploads = _upload_queries(split, 8)
    transform = eval_transform(manifest.preprocess)
    torch_split = encode_split(model, split, batch_size=64, progress=False)
    gallery_torch = torch.from_numpy(torch_split.gallery_embeds)

    def user_calls(retrievers: dict[str, Any]) -> dict[str, Callable[[], object]]:
        """The full query users run (uploaded reference: decode, preprocess, tokenize, encode, compose,
        search) through the runtime's Retriever, against the same steps in torch eager."""
        turn = iter(range(1 << 30))

        def eager() -> object:
            data, text = uploads[next(turn) % len(uploads)]
            with torch.inference_mode():
                pixel_values = transform(load_image(data))[None]
                query = model.encode_query(pixel_values, tokenize([text], context_length=context))
                return torch.topk(query @ gallery_torch.T, 10)

        table: dict[str, Callable[[], object]] = {"torch": eager}
        for name, retriever in retrievers.items():
            table[name] = _user_query(retriever, uploads)
        return table

    # One thread is the robust comparison on a shared machine (torch's OpenMP barriers stall
    # badly when other processes hold the cores); all usable cores is the deployment setting.
    timings: dict[int, tuple[dict[str, float], dict[str, float]]] = {}
    user_timings: dict[int, dict[str, float]] = {}
    for threads in sorted({1, usable}):
        torch.set_num_threads(threads)
        # Idle onnxruntime pool threads spin; interleaved with torch's OpenMP team on the same
        # cores that would stall torch, so spinning is off for the multi-thread rounds.
        sessions = {
            name: open_session(export_dir / manifest.graph("query_encoder", name).file, threads=threads, spinning=threads == 1)
            for name in BACKENDS[1:]
        }
        timings[threads] = (
            _interleaved(calls(1, sessions), rounds=rounds),
            _interleaved(calls(THROUGHPUT_BATCH, sessions), rounds=max(rounds // 3, 5)),
        )
        retrievers = _runtime_retrievers(export_dir, torch_split.gallery_embeds, torch_split.gallery_names, threads=threads)
        user_timings[threads] = _interleaved(user_calls(retrievers), rounds=rounds)
    torch_report = evaluate_split(split, query_embeds=torch_split.queries["composed"], gallery_embeds=torch_split.gallery_embeds,
                                  gallery_names=torch_split.gallery_names)
    recall = {"torch": dict(torch_report.metrics)}
    recall.update({name: dict(manifest.variant(name).accuracy) for name in BACKENDS[1:]})

    figures: dict[str, Any] = {"model": provenance, "threads": sorted(timings), "export_seconds": export_seconds, "backends": {}}
    rows = []
    for threads, (latency, batch_time) in timings.items():
        for name in BACKENDS:
            key = f"{name}@{threads}t"
            figures["backends"][key] = {
                "threads": threads,
                "latency_ms_b1": latency[name] * 1e3,
                "speedup_b1": latency["torch"] / latency[name],
                "queries_per_s_b32": THROUGHPUT_BATCH / batch_time[name],
                "speedup_b32": batch_time["torch"] / batch_time[name],
                "user_query_ms_b1": user_timings[threads][name] * 1e3,
                "user_query_speedup_b1": user_timings[threads]["torch"] / user_timings[threads][name],
                "R@1": recall[name]["R@1"],
                "R@10": recall[name]["R@10"],
                "R@10_drop_vs_torch": recall["torch"]["R@10"] - recall[name]["R@10"],
                "query_cosine_to_fp32": recall[name].get("mean_cosine_to_fp32", 1.0),
            }
            row = figures["backends"][key]
            rows.append([name, threads, row["latency_ms_b1"], f"{row['speedup_b1']:.2f}x", row["queries_per_s_b32"],
                         f"{row['speedup_b32']:.2f}x", row["user_query_ms_b1"], f"{row['user_query_speedup_b1']:.2f}x",
                         row["R@1"], row["R@10"], f"{row['R@10_drop_vs_torch']:+.2f}", f"{row['query_cosine_to_fp32']:.5f}"])
    one = {name: figures["backends"][f"{name}@1t"] for name in BACKENDS}
    int8 = max(("int8-dynamic", "int8-static"), key=lambda n: one[n]["speedup_b1"])
    figures["goals"] = {
        "threads": 1,
        "ort_fp32_2x_b1": one["fp32"]["speedup_b1"] >= 2.0,
        "int8_3x_b1": one[int8]["speedup_b1"] >= 3.0,
        "int8_r10_drop_le_0.5": one[int8]["R@10_drop_vs_torch"] <= 0.5,
        "best_int8": int8,
        "user_query_fp32_2x_b1": one["fp32"]["user_query_speedup_b1"] >= 2.0,
    }
    header = ["backend", "threads", "latency b1 (ms)", "speed-up b1", "queries/s b32", "speed-up b32", "user query b1 (ms)",
              "user speed-up b1", "R@1", "R@10", "R@10 drop", "cos to fp32"]
    table = markdown_table(header, rows)
    plot = bar_chart(
        out_dir / "export.png",
        panels=[
            Panel(
                "latency, batch 1 (lower is better)",
                {f"{t} thread(s)": {n: timings[t][0][n] * 1e3 for n in BACKENDS} for t in timings},
                "ms",
                log_scale=True,
            ),
            Panel(
                "throughput, batch 32",
                {f"{t} thread(s)": {n: THROUGHPUT_BATCH / timings[t][1][n] for n in BACKENDS} for t in timings},
                "queries / s",
            ),
            Panel(
                "synthetic test recall",
                {"R@10": {n: recall[n]["R@10"] for n in BACKENDS}, "R@1": {n: recall[n]["R@1"] for n in BACKENDS}},
                "%",
            ),
        ],
    )
    goals = figures["goals"]
    notes = (
        f"Model: {provenance['source']} ({manifest.model_config.get('name')}, embed {manifest.embed_dim}); "
        f"torch and onnxruntime at the same thread count; {rounds} interleaved rounds at batch 1. Goals (1 thread): "
        f"ORT fp32 >= 2x torch at batch 1: {'met' if goals['ort_fp32_2x_b1'] else 'NOT met'} ({one['fp32']['speedup_b1']:.2f}x); "
        f"{int8} >= 3x: {'met' if goals['int8_3x_b1'] else 'NOT met'} ({one[int8]['speedup_b1']:.2f}x), "
        f"R@10 drop <= 0.5: {'met' if goals['int8_r10_drop_le_0.5'] else 'NOT met'} ({one[int8]['R@10_drop_vs_torch']:+.2f} points); "
        f"the user's full query (runtime Retriever, uploaded reference: decode + preprocess + tokenize + encode + compose + search) "
        f"with fp32 >= 2x the same steps in torch eager: {'met' if goals['user_query_fp32_2x_b1'] else 'NOT met'} "
        f"({one['fp32']['user_query_speedup_b1']:.2f}x). Recall of the ONNX variants is measured through the runtime "
        f"(numpy preprocessing, its tokenizer, split graphs), torch's through torch."
    )
    return BenchResult(name=NAME, figures=figures, table=table, plots=(plot,), notes=notes)
