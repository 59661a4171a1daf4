"""Backbones on the CPU: torch eager against onnxruntime fp32 and the int8 variants, per open_clip model.

Each model of :data:`MODELS` (``COMPIR_BENCH_BACKBONES=ViT-B-32,RN50`` to choose) is built at its
own size (224 px for both) with random weights (seed 0: nothing can be downloaded), saved as a
compir checkpoint and exported with fp32 and the three int8 variants (static scales calibrated on 32 rendered scenes). Then,
on the same inputs (rendered scenes and their edit texts; torch at open_clip's 77 tokens, the
runtime's text graph cut after the batch's longest text, and ``fp32-77``: the same fp32 graphs
forced to 77 tokens, what the cut saves):

- the image encoder and the text encoder separately, and the runtime's composed query
  (:class:`~compir.runtime.encoder.Encoder`: tokenize + image encoder + text encoder + composer)
  against torch eager (open_clip tokenizer + ``CIRModel.encode_query``);
- batch 1 and batch 32, at 1 thread (median of interleaved rounds: one call of each backend per
  round, so load from other processes hits them alike; one thread because torch's OpenMP team
  stalls when other processes hold the cores, which would flatter onnxruntime);
- int8's cosine to fp32 (image, text and query embeddings, mean over 32 inputs);
- what the session options cost: fp32 at onnxruntime's basic / extended / all graph optimisation
  levels (the runtime uses all) and the share of fp32 time spent in MatMul (onnxruntime's profiler);
- fp32 after onnxruntime's transformer optimizer (LayerNorm / SkipLayerNorm / BiasGelu / attention
  fusions into com.microsoft ops): its latency, what it fused and its distance to the plain graph.
  The export does not apply it: on ViT-B-32 it fused no attention and was 4-7 % slower;
- how close to the machine: each encoder's multiply-accumulates (counted from its graph,
  :mod:`benchmarks.macs`) per second at batch 1 on one thread, fp32 and int8-dynamic, against a
  2048 x 2048 GEMM's rate on one thread in the same run (:mod:`benchmarks.gemm_peak`).

Goals: fp32 >= 2x and int8 >= 3x torch at batch 1 (1 thread); int8 cosine to fp32 >= 0.99.
A model that cannot be built or exported is skipped with its reason printed.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchResult, Panel, bar_chart, interleaved_runs, markdown_table
from benchmarks.gemm_peak import SIZE, gemm_peaks
from benchmarks.macs import count_macs

NAME = "backbones"
DESCRIPTION = "per open_clip backbone (ViT-B-32, RN50; random weights): image / text encoder and composed query, torch eager vs ORT"
MODELS = ("ViT-B-32", "RN50")
BACKENDS = ("torch", "fp32", "int8-dynamic", "int8-static", "int8-static-u8")
INT8 = BACKENDS[2:]
FULL_CONTEXT = "fp32-77"  # the fp32 graphs with the text kept at the full 77-token context (no cut)
PARTS = ("image", "text", "query")
BATCH = 32
MAC_VARIANTS = {"fp32": "fp32 numpy", "int8-dynamic": "u8s8 onnxruntime"}  # variant -> the GEMM peak it is judged by
QUERY_TEXT = "make the red circle bigger and move it to the top left"


def _models() -> list[str]:
    chosen = os.environ.get("COMPIR_BENCH_BACKBONES")
    return [m.strip() for m in chosen.split(",") if m.strip()] if chosen else list(MODELS)


def _export(name: str, work: Path) -> tuple[Path, float]:
    """A random-weight checkpoint of ``name`` exported with the defaults; (export folder, seconds)."""
    import torch

    from compir.export.to_onnx import export_onnx
    from compir.train.checkpoint import save_checkpoint
    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    torch.manual_seed(0)
    checkpoint = work / f"{name}.pt"
    save_checkpoint(checkpoint, model=CIRModel(resolve_model_config(name)), metrics={}, step=0, epoch=0)
    started = time.perf_counter()
    export_onnx(checkpoint, out_dir=work / name, variants=BACKENDS[1:], calibration_count=BATCH, overwrite=True)
    return work / name, time.perf_counter() - started


def _session(path: Path, *, threads: int, level: str = "all", profile: str | None = None) -> Any:
    """An onnxruntime CPU session as the runtime opens it (:func:`open_session`), or at another graph level."""
    import onnxruntime

    from compir.runtime.backends.ort import open_session

    if level == "all" and profile is None:
        return open_session(path, threads=threads, spinning=threads == 1)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _runner(session: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(None, feeds)


def _transformer_fused(path: Path, target: Path) -> tuple[Path, dict[str, int]]:
    """The fp32 graph through onnxruntime's transformer optimizer (LayerNorm, SkipLayerNorm, BiasGelu, attention
    fusions into com.microsoft contrib ops; CPU only, TensorRT cannot run them); (graph, fused op counts)."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(path), model_type="clip", opt_level=0)  # heads / width read from the graph
    counts = {op: int(n) for op, n in fused.get_fused_operator_statistics().items() if n}
    fused.save_model_to_file(str(target))
    return target, counts


def _matmul_share(path: Path, feeds: dict[str, np.ndarray], *, prefix: str) -> float:
    """Share of the fp32 graph's kernel time (1 thread, batch 1) spent in MatMul-type nodes."""
    session = _session(path, threads=1, profile=prefix)
    for _ in range(3):
        session.run(None, feeds)
    profile = Path(session.end_profiling())
    kernel: Counter[str] = Counter()
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            kernel[event["args"]["op_name"]] += event["dur"]
    profile.unlink()
    total = sum(kernel.values())
    return sum(v for op, v in kernel.items() if "MatMul" in op or op in ("Gemm", "Conv")) / total if total else float("nan")


def _bench_model(name: str, work: Path, *, rounds: int, batch_rounds: int, usable: int) -> dict[str, Any]:
    import torch

    from compir.export.parity import mean_cosine
    from compir.export.samples import load_samples
    from compir.manifest import load_manifest
    from compir.runtime.backends.ort import OrtBackend
    from compir.runtime.encoder import Encoder, fit_length, text_length
    from compir.train.checkpoint import load_checkpoint

    export_dir, export_seconds = _export(name, work)
    manifest = load_manifest(export_dir)
    model = load_checkpoint(work / f"{name}.pt").model.eval()
    samples = load_samples(preprocess=manifest.preprocess, tokenizer=model.tokenizer, count=BATCH)
    px, ids = samples.pixel_values, samples.input_ids  # ids at the full context (77)
    graphs = {v: {part: export_dir / manifest.graph(f"{part}_encoder", v).file for part in ("image", "text")} for v in BACKENDS[1:]}

    def torch_calls(batch: int) -> dict[str, Callable[[], object]]:
        pt, it = torch.from_numpy(px[:batch]), torch.from_numpy(ids[:batch])

        def run(fn: Callable[[], object]) -> Callable[[], object]:
            def call() -> object:
                with torch.inference_mode():
                    return fn()

            return call

        return {
            "image": run(lambda: model.encode_image(pt)),
            "text": run(lambda: model.encode_text(it)),
            "query": run(lambda: model.encode_query(pt[:1], model.tokenizer([QUERY_TEXT]))),
        }

    def ort_calls(variant: str, batch: int, threads: int, *, full: bool = False) -> dict[str, Callable[[], object]]:
        """The runtime's calls; ``full``: only text and query, with the token ids kept at the full context."""
        image, text = (_session(graphs[variant][part], threads=threads) for part in ("image", "text"))
        text_ids = ids[:batch] if full else fit_length(ids[:batch], length=text_length(manifest.graph("text_encoder", variant)),
                                                       pad_id=manifest.tokenizer.pad_id)
        calls: dict[str, Callable[[], object]] = {"text": lambda: text.run(["text_embeds"], {"input_ids": text_ids})}
        if not full:
            calls["image"] = lambda: image.run(["image_embeds"], {"pixel_values": px[:batch]})
        if batch == 1:  # the runtime's own query path, as a user's search runs it
            backend = OrtBackend(export_dir, providers=["cpu"], threads=threads, spinning=threads == 1)
            encoder = Encoder(export_dir, manifest, backend, variant=variant)
            if full:
                encoder.text_length = manifest.tokenizer.context_length

            def query() -> object:
                features = encoder.encode_pixels(px[:1]).image_features
                return encoder.compose(features, encoder.encode_input_ids(encoder.tokenize([QUERY_TEXT])).text_features)

            calls["query"] = query
        return calls

    timings: dict[str, dict[str, dict[str, list[float]]]] = {}  # setting -> part -> backend -> seconds
    for setting, batch, threads, count in (("b1", 1, 1, rounds), ("b32", BATCH, 1, batch_rounds)):
        torch.set_num_threads(threads)
        per_backend = {"torch": torch_calls(batch), **{v: ort_calls(v, batch, threads) for v in BACKENDS[1:]},
                       FULL_CONTEXT: ort_calls("fp32", batch, threads, full=True)}
        timings[setting] = {
            part: interleaved_runs({backend: calls[part] for backend, calls in per_backend.items() if part in calls}, rounds=count)
            for part in PARTS if part in per_backend["fp32"]
        }

    # Session options: fp32 at each graph level (1 thread, batch 1), and where its time goes; and the graph
    # after onnxruntime's transformer optimizer (not adopted by the export: no gain measured, see the README).
    levels: dict[str, dict[str, float]] = {}
    fusions: dict[str, dict[str, Any]] = {}
    for part, feeds in (("image", {"pixel_values": px[:1]}), ("text", {"input_ids": ids[:1]})):
        fused_path, counts = _transformer_fused(graphs["fp32"][part], work / f"{name}-{part}-fused.onnx")
        sessions = {level: _session(graphs["fp32"][part], threads=1, level=level) for level in ("basic", "extended", "all")}
        sessions["fused"] = _session(fused_path, threads=1)
        embeds_key = f"{part}_embeds"
        reference, fused_out = (sessions[k].run([embeds_key], feeds)[0] for k in ("all", "fused"))
        fusions[part] = {"ops": counts, "max_abs_to_fp32": float(np.abs(fused_out - reference).max())}
        runs = interleaved_runs({level: _runner(session, feeds) for level, session in sessions.items()}, rounds=max(rounds // 2, 3))
        levels[part] = {level: float(np.median(v)) * 1e3 for level, v in runs.items()}
        levels[part]["matmul_share"] = _matmul_share(graphs["fp32"][part], feeds, prefix=str(work / f"{name}-{part}"))
        del sessions
        fused_path.unlink()

    # Multiply-accumulates per call at batch 1 (the inputs the b1 timings ran), for the achieved MAC/s.
    size = manifest.preprocess.image_size
    b1_ids = fit_length(ids[:1], length=text_length(manifest.graph("text_encoder", "fp32")), pad_id=manifest.tokenizer.pad_id)
    macs = {v: {"image": count_macs(graphs[v]["image"], input_shapes={"pixel_values": (1, 3, size, size)}),
                "text": count_macs(graphs[v]["text"], input_shapes={"input_ids": b1_ids.shape})} for v in MAC_VARIANTS}

    # int8's cost: cosine of its embeddings to fp32's on the same 32 inputs.
    embeds = {}
    for variant in BACKENDS[1:]:
        encoder = Encoder(export_dir, manifest, OrtBackend(export_dir, providers=["cpu"], threads=usable), variant=variant)
        image, text = encoder.encode_pixels(px), encoder.encode_input_ids(ids)
        embeds[variant] = {"image": image.image_embeds, "text": text.text_embeds,
                           "query": encoder.compose(image.image_features, text.text_features)}
    cosine = {v: {part: mean_cosine(embeds[v][part], embeds["fp32"][part]) for part in PARTS} for v in INT8}
    return {
        "export_seconds": export_seconds,
        "export_mib": sum(f.stat().st_size for f in export_dir.rglob("*") if f.is_file()) / 2**20,
        "ms": {s: {p: {b: float(np.median(v)) * 1e3 for b, v in parts.items()} for p, parts in t.items()} for s, t in timings.items()},
        "min_ms": {s: {p: {b: float(np.min(v)) * 1e3 for b, v in parts.items()} for p, parts in t.items()} for s, t in timings.items()},
        "int8_cosine_to_fp32": cosine,
        "fp32_graph_levels_ms": levels,
        "fp32_transformer_fusions": fusions,
        "macs_b1": {v: {part: count.macs for part, count in parts.items()} for v, parts in macs.items()},
        "macs_unresolved": {v: {part: list(count.unresolved) for part, count in parts.items()} for v, parts in macs.items()},
    }


def _mac_rate_table(results: dict[str, Any], peaks: dict[str, float]) -> str:
    """Achieved G MAC/s of each encoder (batch 1, 1 thread, best run) against the same run's GEMM peak for its dtype."""
    rows = []
    for name, r in results.items():
        for variant, peak_name in MAC_VARIANTS.items():
            for part in ("image", "text"):
                macs, ms = r["macs_b1"][variant][part], r["min_ms"]["b1"][part][variant]
                rate = macs / ms / 1e6
                rows.append([name, part, variant, f"{macs / 1e9:.3f}", ms, f"{rate:.1f}", f"{peaks[peak_name]:.1f} ({peak_name})",
                             f"{100 * rate / peaks[peak_name]:.0f} %"])
    from compir.doctor.machine import cpu_info

    others = ", ".join(f"{k} {v:.1f}" for k, v in peaks.items())
    cpu = cpu_info()
    return (
        f"\n\nMultiply-accumulates per second on {cpu.model} (CPU class {cpu.cpu_class}; batch 1, 1 thread, best run; MACs of "
        f"MatMul / Gemm / Conv counted from the graph) against a {SIZE}x{SIZE} GEMM on one thread in the same run "
        f"(G MAC/s: {others}):\n\n"
        + markdown_table(["model", "part", "variant", "G MACs", "b1 min ms", "G MAC/s", "GEMM peak G MAC/s", "of peak"], rows)
    )


def _skip_reason(name: str) -> str | None:
    """Why ``name`` cannot be benchmarked here (None when compir builds it and it encodes an image and a text)."""
    import torch

    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    try:
        model = CIRModel(resolve_model_config(name)).eval()
        size = model.preprocess.image_size
        with torch.inference_mode():
            model.encode_query(torch.zeros(1, 3, size, size), torch.zeros(1, model.context_length, dtype=torch.int64))
    except Exception as exc:  # any failure of an unsupported family: reported, the other models still run
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rounds, batch_rounds = (3, 1) if quick else (10, 2)
    work = out_dir / "backbones-work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in _models():
        reason = _skip_reason(name)
        if reason is not None:
            skipped[name] = reason
            print(f"backbones: skipping {name}: {reason}", flush=True)
            continue
        print(f"backbones: {name}", flush=True)
        results[name] = _bench_model(name, work, rounds=rounds, batch_rounds=batch_rounds, usable=usable)

    rows = []
    goals: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        b1, b32 = r["ms"]["b1"], r["ms"]["b32"]
        for part in PARTS:
            for backend in (*BACKENDS, FULL_CONTEXT):
                if backend not in b1[part]:
                    continue
                speed = b1[part]["torch"] / b1[part][backend]
                batch_cells: list[Any] = ["-", "-"]
                if backend in b32.get(part, {}):
                    rate = BATCH / b32[part][backend] * 1e3
                    batch_cells = [rate, f"{b32[part]['torch'] / b32[part][backend]:.2f}x"]
                cos = f"{r['int8_cosine_to_fp32'][backend][part]:.4f}" if backend in INT8 else "-"
                rows.append([name, part, backend, b1[part][backend], r["min_ms"]["b1"][part][backend], f"{speed:.2f}x", *batch_cells, cos])
        goals[name] = {
            "fp32_2x_b1": {p: b1[p]["torch"] / b1[p]["fp32"] >= 2.0 for p in PARTS},
            "int8_3x_b1": {v: {p: b1[p]["torch"] / b1[p][v] >= 3.0 for p in PARTS} for v in INT8},
            "int8_cosine_0.99": {v: {p: r["int8_cosine_to_fp32"][v][p] >= 0.99 for p in PARTS} for v in INT8},
        }
    header = ["model", "part", "backend", "b1 median ms", "b1 min ms", "speed-up b1", "b32 items/s",
              "speed-up b32", "int8 cos to fp32"]
    table = markdown_table(header, rows)
    level_rows = [
        [name, part, *(f"{r['fp32_graph_levels_ms'][part][lvl]:.1f}" for lvl in ("basic", "extended", "all", "fused")),
         f"{100 * r['fp32_graph_levels_ms'][part]['matmul_share']:.0f} %",
         ", ".join(f"{op} {n}" for op, n in r["fp32_transformer_fusions"][part]["ops"].items()) or "none",
         f"{r['fp32_transformer_fusions'][part]['max_abs_to_fp32']:.1e}"]
        for name, r in results.items() for part in ("image", "text")
    ]
    table += (
        "\n\nfp32 at each onnxruntime graph optimisation level (batch 1, 1 thread, median ms), after onnxruntime's "
        "transformer optimizer (`optimize_model`, model_type clip; contrib ops, CPU only), and the share in MatMul / Conv:\n\n"
    )
    table += markdown_table(
        ["model", "part", "basic", "extended", "all (runtime)", "transformer-fused", "MatMul + Conv share", "fused ops",
         "fused max abs to fp32"],
        level_rows,
    )
    peaks = gemm_peaks() if results else {}
    if results:
        table += _mac_rate_table(results, peaks)  # a table, not a plot: the CPU class goes with every figure
    plots = []
    if results:
        plots.append(bar_chart(out_dir / "backbones.png", panels=[
            Panel(f"{part}, batch 1, 1 thread (lower is better)",
                  {name: r["ms"]["b1"][part] for name, r in results.items()}, "ms", log_scale=True)
            for part in PARTS
        ]))
    notes = (
        f"Random weights (seed 0), 224 px, torch at 77 tokens, the runtime's text cut after the longest text ({FULL_CONTEXT}: "
        f"kept at 77), 1 thread; {rounds} interleaved rounds at batch 1, {batch_rounds} at "
        f"batch {BATCH}. Speed-ups are torch eager's median over the backend's. Goals met: "
        + json.dumps(goals)
        + (f". Skipped: {json.dumps(skipped)}" if skipped else "")
    )
    figures = {"models": results, "skipped": skipped, "goals": goals, "threads": 1, "gemm_peak_gmacs": peaks}
    return BenchResult(name=NAME, figures=figures, table=table, plots=tuple(plots), notes=notes)
