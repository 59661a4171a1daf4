"""Which variant of an export folder answers a query fastest on this machine, timed in a few seconds
through the runtime's own :class:`compir.runtime.encoder.Encoder` (so on the providers a search gets).

A query is what ``compir search`` runs per request once the inputs are prepared: the image graph on
one reference image, the text graph on one text, the composer. Preprocessing and tokenization are the
same for every variant and left out. Each variant gets an equal share of the time, after its
session is opened and warmed up; the fastest by median is named, with the recall cost the export
measured for it (``compir export onnx --eval-data``), since a faster variant can rank worse.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compir.doctor.report import Section
from compir.errors import CompirError
from compir.manifest import IMAGE_ENCODER, load_manifest

_MIN_RUNS = 3
_MAX_RUNS = 500


@dataclass(frozen=True)
class VariantTiming:
    variant: str
    query_ms: float  # median of ``runs`` queries
    best_ms: float
    runs: int
    providers: tuple[str, ...]  # what the image graph's session got
    recall_drop: float | None  # recall@10 drop against fp32 measured at export time (None: not measured)


def time_variants(export_dir: str | Path, *, seconds: float = 3.0, providers: list[str] | None = None) -> list[VariantTiming]:
    """Time one query per variant of ``export_dir`` for about ``seconds`` in all; ContractError where the folder is no export."""
    from compir.runtime.encoder import Encoder

    manifest = load_manifest(export_dir, verify_files=False)  # each Encoder verifies the checksums
    names = list(manifest.variants)
    timings = []
    for name in names:
        encoder = Encoder.from_export(export_dir, providers=providers, variant=name)
        encoder.warmup()
        size = manifest.preprocess.image_size
        pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)  # (1, 3, S, S)
        input_ids = encoder.tokenize(["make it red"])  # (1, L)

        def query(encoder: Encoder = encoder, pixels: np.ndarray = pixels, input_ids: np.ndarray = input_ids) -> None:
            encoder.compose(encoder.encode_pixels(pixels).image_features, encoder.encode_input_ids(input_ids).text_features)

        runs = _timed(query, budget_s=seconds / len(names))
        drop = manifest.variants[name].accuracy.get("recall_at_10_drop")
        loaded = encoder.backend_info().get("providers")
        timings.append(VariantTiming(
            variant=name, query_ms=1e3 * statistics.median(runs), best_ms=1e3 * min(runs), runs=len(runs),
            providers=tuple(loaded.get(IMAGE_ENCODER, ())) if isinstance(loaded, dict) else (), recall_drop=drop,
        ))
    return timings


def _timed(call: Callable[[], None], *, budget_s: float) -> list[float]:
    """Seconds per call: at least a few calls, then until ``budget_s`` is spent."""
    runs: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(runs) < _MIN_RUNS or (time.perf_counter() < deadline and len(runs) < _MAX_RUNS):
        started = time.perf_counter()
        call()
        runs.append(time.perf_counter() - started)
    return runs


def export_section(export_dir: Path, *, seconds: float) -> Section:
    try:
        timings = time_variants(export_dir, seconds=seconds)
    except CompirError as exc:
        return Section("export", f"{export_dir}: cannot be timed", {"export_dir": str(export_dir), "error": str(exc)}, (str(exc),))
    fastest = min(timings, key=lambda timing: timing.query_ms)
    drop = "" if fastest.recall_drop is None else f", R@10 drop vs fp32 {fastest.recall_drop:+.2f} (measured at export)"
    reference = next((timing for timing in timings if timing.variant == "fp32"), None)
    speedup = f", {reference.query_ms / fastest.query_ms:.2f}x fp32" if reference and reference is not fastest else ""
    return Section(
        "export", f"fastest variant here: {fastest.variant} ({fastest.query_ms:.2f} ms per query{speedup}{drop}); "
                  f"use it with --variant {fastest.variant}",
        {"export_dir": str(export_dir), "fastest": fastest.variant, "seconds": seconds,
         "variants": [{"variant": t.variant, "query_ms": round(t.query_ms, 3), "best_ms": round(t.best_ms, 3), "runs": t.runs,
                       "providers": list(t.providers), "recall_at_10_drop": t.recall_drop} for t in timings]},
        lines=tuple(f"{t.variant}: {t.query_ms:.2f} ms per query (median of {t.runs}, best {t.best_ms:.2f}) on "
                    f"{', '.join(t.providers) or 'unknown providers'}"
                    + ("" if t.recall_drop is None else f", R@10 drop vs fp32 {t.recall_drop:+.2f}") for t in timings),
    )
