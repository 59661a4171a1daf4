"""The torch-free runtime: per-stage latency of a query, and gallery indexing throughput.

(a) Latency split (decode, preprocess, image encode, tokenize, text encode, compose, search,
    re-rank) of a full query (reference image file + new text), of a cached-reference query
    (gallery item id: its image features are stored in the index) and of a cached query with a
    repeated text (the Retriever's text cache). Goal: the cached-reference query costs no more
    than 1.10x its tokenize + text encode + compose + search stages (no image work, little
    overhead).
(d) Gallery indexing, images/s: ``compir index build`` (thread-pool decoding, batched
    onnxruntime, HNSW build and atomic save included) against the training stack's path (torch
    DataLoader with workers + open_clip's eval transform + ``CIRModel.encode_image``, encoding
    only). Goal: >= 1.5x. Then ``compir index build --ray`` (Ray Data, local Ray, same cores) against
    it, and a projection to N machines: benchmarks/ray_indexing.py.
The models are randomly initialised CIRModels (compir train's default; full runs add ``small``)
exported to ONNX fp32: speed does not depend on the weights. Gallery images are 320x240 JPEG photos-like
images, so decoding costs what it costs on real data.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import ray_indexing
from benchmarks.common import BenchResult, Panel, bar_chart, machine_info, markdown_table
from compir.runtime.types import STAGES

NAME = "runtime"
DESCRIPTION = "runtime query latency split (full vs cached reference) and indexing images/s vs a torch DataLoader path"


def _make_export(work: Path, config: str) -> Path:
    import torch

    from compir.export.to_onnx import export_onnx
    from compir.train.checkpoint import save_checkpoint
    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    torch.manual_seed(0)
    work.mkdir(parents=True, exist_ok=True)
    model = CIRModel(resolve_model_config(config)).eval()
    save_checkpoint(work / "model.pt", model=model, metrics={}, step=0, epoch=0)
    export_onnx(work / "model.pt", out_dir=work / "export", variants=("fp32",))
    return work / "export"


def _write_photos(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:240, 0:320].astype(np.float32)
    paths = []
    for number in range(count):
        phase = rng.uniform(0, 6.28, size=3)
        base = np.stack([np.sin(x / (20 + 7 * c) + phase[c]) + np.cos(y / (15 + 5 * c)) for c in range(3)], axis=-1)
        pixels = np.clip(127 + 60 * base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo{number:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def _latency(export_dir: Path, index_dir: Path, probe: Path, *, queries: int) -> dict[str, Any]:
    from compir.runtime.retriever import Retriever

    retriever = Retriever.from_dirs(export_dir, index_dir, providers=["cpu"])
    item = retriever.item_ids()[0]
    modes: dict[str, Any] = {
        "full query": lambda i: {"reference_image": probe, "text": f"make it red and larger, variant {i}"},
        "cached reference": lambda i: {"reference_id": item, "text": f"make it blue, variant {i}"},
        "cached reference + repeated text": lambda i: {"reference_id": item, "text": "make it green"},
    }
    results: dict[str, Any] = {}
    for mode, build in modes.items():
        walls: list[float] = []
        ratios: list[float] = []
        stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for i in range(queries + 3):
            start = time.perf_counter()
            query: dict[str, Any] = build(i)
            result = retriever.search_detailed(k=10, **query)
            wall = (time.perf_counter() - start) * 1000
            if i < 3:
                continue  # warm-up
            walls.append(wall)
            # Per query, so that a preemption on a busy machine does not skew one side of the ratio.
            ratios.append(wall / sum(result.timings_ms.get(s, 0.0) for s in ("tokenize", "text_encode", "compose", "search")))
            for stage in STAGES:
                stages[stage].append(result.timings_ms.get(stage, 0.0))
        medians = {stage: statistics.median(values) for stage, values in stages.items()}
        results[mode] = {
            "wall_ms": statistics.median(walls), "stages_ms": medians, "wall_over_text_compose_search": statistics.median(ratios),
        }
    cached = results["cached reference"]
    results["cached_overhead_ratio"] = cached["wall_over_text_compose_search"]
    results["cached_pays_image_encode"] = cached["stages_ms"]["image_encode"] > 0
    results["rerank"] = "no re-ranker in this export" if not retriever.has_reranker else "measured"
    return results


def _torch_indexing(checkpoint: Path, files: list[Path], *, batch_size: int, workers: int) -> float:
    """Seconds for the training stack to encode ``files`` (DataLoader workers + torch model)."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from compir.images import load_image
    from compir.train.checkpoint import load_checkpoint
    from compir.train.transforms import eval_transform

    loaded = load_checkpoint(checkpoint)
    transform = eval_transform(loaded.preprocess)

    class Images(Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, index: int) -> Any:
            return transform(load_image(files[index]))

    loader = DataLoader(Images(), batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    with torch.inference_mode():
        embeds = [loaded.model.encode_image(batch)[0].numpy() for batch in loader]
    assert sum(len(e) for e in embeds) == len(files)
    return time.perf_counter() - start


def _runtime_indexing(export_dir: Path, images: Path, out: Path, *, batch_size: int, workers: int) -> float:
    from compir.runtime.build import build_index
    from compir.runtime.encoder import Encoder

    encoder = Encoder.from_export(export_dir, providers=["cpu"], spinning=False)  # as compir index build does
    encoder.warmup()
    report = build_index(encoder, images=images, out=out, batch_size=batch_size, workers=workers, overwrite=True, progress=False)
    return report.seconds


def _ray_rows(export_dir: Path, work: Path, *, count: int, repeats: int, single_images_per_s: float) -> dict[str, Any]:
    """Ray Data indexing of 32 and 4 x ``count`` photos (see benchmarks/ray_indexing.py)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return {"skipped": 'ray is not installed: pip install "compir[ray]"'}
    _write_photos(work / "ray-small", 32)
    _write_photos(work / "ray-images", 4 * count)
    return ray_indexing.measure(export_dir, small=work / "ray-small", large=work / "ray-images", work=work / "ray",
                                repeats=max(3, repeats), single_images_per_s=single_images_per_s)


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    # Indexing is measured for the default model and, in full runs, for the larger ``small``
    # (where both paths spend most of their time in the same matrix products); the latency split
    # uses the last of them.
    from compir.train.config import DEFAULT_MODEL

    configs, count, queries, repeats = ((DEFAULT_MODEL,), 256, 30, 2) if quick else ((DEFAULT_MODEL, "small"), 1024, 100, 3)
    workers = min(4, os.cpu_count() or 2)
    indexing: dict[str, dict[str, Any]] = {}
    exports: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="compir-bench-runtime-") as tmp:
        work = Path(tmp)
        files = _write_photos(work / "images", count)
        for config in configs:
            exports[config] = _make_export(work / config, config)
            runtime_s = [
                _runtime_indexing(exports[config], work / "images", work / config / "index", batch_size=64, workers=workers)
                for _ in range(repeats)
            ]
            torch_s = [_torch_indexing(work / config / "model.pt", files, batch_size=64, workers=workers) for _ in range(repeats)]
            runtime_rate, torch_rate = count / statistics.median(runtime_s), count / statistics.median(torch_s)
            indexing[config] = {"images": count, "workers": workers, "runtime_images_per_s": runtime_rate, "torch_images_per_s": torch_rate,
                                "speedup": runtime_rate / torch_rate, "runtime_runs_s": runtime_s, "torch_runs_s": torch_s}
        ray_figures = _ray_rows(exports[configs[0]], work, count=count, repeats=repeats,
                                single_images_per_s=indexing[configs[0]]["runtime_images_per_s"])
        config = configs[-1]
        latency = _latency(exports[config], work / config / "index", files[-1], queries=queries)
    modes = [m for m in latency if isinstance(latency[m], dict)]
    rows = [[mode, f"{latency[mode]['wall_ms']:.2f}", *(f"{latency[mode]['stages_ms'][s]:.2f}" for s in STAGES)] for mode in modes]
    index_rows = [
        [name, f"{v['runtime_images_per_s']:.1f}", f"{v['torch_images_per_s']:.1f}", f"{v['speedup']:.2f}x"] for name, v in indexing.items()
    ]
    table = "\n\n".join([
        f"Model `{config}` (random weights, ONNX fp32, onnxruntime CPU). Median of {queries} queries, k=10.",
        markdown_table(["query", "wall ms", *STAGES], rows),
        f"Cached-reference wall / (tokenize + text encode + compose + search), median per query = {latency['cached_overhead_ratio']:.3f} "
        f"(goal <= 1.10); image encode paid by the cached query: {latency['cached_pays_image_encode']}; re-rank: {latency['rerank']}.",
        f"Indexing {count} photos (median of {repeats} runs): `compir index build` (onnxruntime, thread-pool decoding, HNSW build and "
        f"save included) against a torch DataLoader ({workers} workers) + CIRModel.encode_image (encoding only). Goal >= 1.5x.",
        markdown_table(["model", "compir images/s", "torch images/s", "speed-up"], index_rows),
        ray_indexing.table(ray_figures, cpu=str(machine_info()["cpu"])),
    ])
    plot = bar_chart(out_dir / "runtime.png", panels=[
        Panel("query latency by stage (ms)", {mode: {s: latency[mode]["stages_ms"][s] for s in STAGES} for mode in modes}, "ms"),
        Panel("gallery indexing", {name: {"compir runtime": v["runtime_images_per_s"], "torch DataLoader": v["torch_images_per_s"]}
                                   for name, v in indexing.items()}, "images/s"),
    ])
    figures = {"model": config, "latency": latency, "indexing": indexing, "ray_indexing": ray_figures,
               "goal_cached_within_10pct": float(latency["cached_overhead_ratio"]) <= 1.10,
               "goal_indexing_1_5x": {name: v["speedup"] >= 1.5 for name, v in indexing.items()}}
    return BenchResult(name=NAME, figures=figures, table=table, plots=(plot,))
