"""The device check's two measurements on an export folder: onnxruntime's CUDA provider against its
CPU provider (max abs difference per graph), and composed-query latency of the fused
``query_encoder`` graph against torch eager on the same device (:mod:`compir.devicecheck`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import time_runs
from compir.manifest import BATCH_AXIS, SEQUENCE_AXIS, GraphSpec, load_manifest

_WARMUP = 3
_TOKEN_IDS = (1, 1000)  # random ids below every vocabulary compir ships: parity needs valid rows, not sentences


def providers_for(device: str) -> list[str]:
    """onnxruntime providers for ``--device``: CUDA (device 0 or the given index), else the CPU."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def random_feeds(graph: GraphSpec, *, batch: int, tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the manifest's shapes: ``batch`` rows, ``tokens`` token positions; floats ~ N(0, 1), ids random."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in graph.inputs:
        shape = [batch if d == BATCH_AXIS else tokens if d == SEQUENCE_AXIS else int(d) for d in spec.shape]
        if spec.dtype.startswith("int"):
            feeds[spec.name] = rng.integers(*_TOKEN_IDS, size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.normal(size=shape).astype(spec.dtype)
    return feeds


def provider_parity(export_dir: Path, *, device: str = "cuda", batch: int = 4) -> dict[str, float]:
    """Max abs difference of every fp32 graph's outputs between ``device``'s provider and the CPU's."""
    import onnxruntime as ort

    folder = Path(export_dir)
    manifest = load_manifest(folder)
    worst: dict[str, float] = {}
    for role, graph in manifest.variant("fp32").graphs.items():
        feeds = random_feeds(graph, batch=batch, tokens=manifest.tokenizer.context_length)
        runs = [ort.InferenceSession(str(folder / graph.file), providers=p).run(None, feeds)
                for p in (providers_for(device), ["CPUExecutionProvider"])]
        worst[role] = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(*runs, strict=True))
    return worst


def query_latency(
    export_dir: Path, *, checkpoint: Path, device: str, batches: tuple[int, ...] = (1, 32), rounds: int = 20
) -> dict[str, dict[str, Any]]:
    """Median ms of one composed-query batch: the fused ``query_encoder`` graph on ``device``'s
    provider (numpy in and out, copies included) against ``CIRModel.encode_query`` in torch eager."""
    import onnxruntime as ort
    import torch

    from compir.train.checkpoint import load_checkpoint

    folder = Path(export_dir)
    manifest = load_manifest(folder)
    graph = manifest.graph("query_encoder")
    session = ort.InferenceSession(str(folder / graph.file), providers=providers_for(device))
    model = load_checkpoint(checkpoint, map_location=device).model.eval().to(device)
    figures: dict[str, dict[str, Any]] = {}
    for batch in batches:
        feeds = random_feeds(graph, batch=batch, tokens=manifest.tokenizer.context_length)
        pixels, ids = (torch.from_numpy(feeds[name]).to(device) for name in ("pixel_values", "input_ids"))

        def torch_call(p: torch.Tensor = pixels, i: torch.Tensor = ids) -> None:
            with torch.no_grad():
                model.encode_query(p, i)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        figures[str(batch)] = {
            "onnxruntime_ms": _median_ms(partial(session.run, None, feeds), rounds=rounds),
            "torch_ms": _median_ms(torch_call, rounds=rounds),
            "providers": session.get_providers()[:1],
        }
    return figures


def _median_ms(call: Callable[[], Any], *, rounds: int) -> float:
    return round(1000 * time_runs(call, repeats=rounds, warmup=_WARMUP).median_s, 3)
