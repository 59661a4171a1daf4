"""The synthetic benchmark's generator: speed, and how hard the dataset it writes is.

Speed (median of several runs): queries sampled per second (what on-the-fly training needs),
scenes rendered per second (in memory, and with PNG encoding), and a whole ``write_synthetic``
(images per second on all cores). Statistics of the written dataset: queries per kind, seen /
unseen, gallery size, siblings per reference, and the raw-pixel image-only baseline (R@1 must stay
<= 20 % on test: the hardness gate).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchResult, Panel, bar_chart, markdown_table, time_runs
from compir.data.baselines import image_only_pixel_report
from compir.data.load import load_split
from compir.data.synth import SynthConfig, sample_train_query
from compir.data.synth_scene import render_scene, render_scene_array
from compir.data.synth_write import write_synthetic

NAME = "synth"
DESCRIPTION = "synthetic benchmark: generation speed, dataset statistics, raw-pixel image-only R@1 (hardness gate)"
QUICK_CONFIG = SynthConfig(n_train=1_000, n_val=200, n_test=400)


def _speeds(*, quick: bool) -> dict[str, dict[str, Any]]:
    n = 1_000 if quick else 20_000
    repeats = 3 if quick else 5
    rng = np.random.default_rng(0)
    queries = [sample_train_query(rng) for _ in range(n)]
    scenes = [q.target for q in queries]

    def sample() -> None:
        local = np.random.default_rng(1)
        for _ in range(n):
            sample_train_query(local)

    def render() -> None:
        for scene in scenes:
            render_scene_array(scene, size=64)

    def render_png() -> None:
        for scene in scenes[: n // 4]:
            render_scene(scene, size=64).save(io.BytesIO(), format="PNG")

    timings = {
        "sample train queries": (time_runs(sample, repeats=repeats), n),
        "render (array)": (time_runs(render, repeats=repeats), n),
        "render + PNG encode": (time_runs(render_png, repeats=repeats), n // 4),
    }
    return {label: {"per_s": timing.rate(items), "items": items, **timing.to_dict()} for label, (timing, items) in timings.items()}


def _statistics(root: Path, config: SynthConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    stats: dict[str, Any] = {}
    baseline: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        data = load_split(root, split=split)
        by_reference: dict[str, int] = {}
        for query in data.queries:
            by_reference[query.reference] = by_reference.get(query.reference, 0) + 1
        siblings = [len(set(q.subset) - {q.reference, q.targets[0]}) for q in data.queries]
        stats[split] = {
            "queries": len(data.queries),
            "references": len(by_reference),
            "gallery": len(data.gallery),
            "unseen": sum(bool(q.unseen) for q in data.queries),
            "siblings_per_reference_mean": float(np.mean(siblings)) if siblings else 0.0,
            "siblings_per_reference_min": int(min(siblings)) if siblings else 0,
            "kinds": {kind: sum(q.kind == kind for q in data.queries) for kind in ("add", "remove", "change", "move")},
        }
        if split != "train":
            report = image_only_pixel_report(data)
            baseline[split] = {"metrics": report.metrics, "breakdown": report.breakdown}
    baseline["chance_rs1"] = 100.0 / config.edits_per_reference
    return stats, baseline


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    config = QUICK_CONFIG if quick else SynthConfig()
    speeds = _speeds(quick=quick)
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="compir-bench-synth-") as tmp:
        root = Path(tmp) / "synth"
        start = time.perf_counter()
        summary = write_synthetic(root, seed=0, config=config, workers=workers)
        write_s = time.perf_counter() - start
        stats, baseline = _statistics(root, config)
    speeds["write_synthetic (all cores)"] = {
        "per_s": summary.n_images / write_s, "items": summary.n_images, "median_s": write_s, "runs_s": [write_s],
    }

    rows: list[list[Any]] = [
        [f"speed: {label}", f"{v['per_s']:,.0f} /s", f"{v['items']} items, median {v['median_s']:.3f} s"] for label, v in speeds.items()
    ]
    for split, values in stats.items():
        kinds = ", ".join(f"{k} {n}" for k, n in values["kinds"].items())
        rows.append([f"{split}: queries / refs / gallery", f"{values['queries']} / {values['references']} / {values['gallery']}", kinds])
        siblings = f"{values['unseen']}, {values['siblings_per_reference_mean']:.2f}"
        rows.append([f"{split}: unseen, siblings per ref", siblings, f"min {values['siblings_per_reference_min']}"])
    for split in ("val", "test"):
        m = baseline[split]["metrics"]
        detail = f"R@5 {m['R@5']:.2f}, R@50 {m['R@50']:.2f}, Rs@1 {m['Rs@1']:.2f} (chance {baseline['chance_rs1']:.1f})"
        rows.append([f"{split}: image-only R@1 (raw pixels)", f"{m['R@1']:.2f} %", detail])
    table = markdown_table(["measure", "value", "detail"], rows)

    test_kinds = stats["test"]["kinds"]
    r1 = {group: values["R@1"] for group, values in baseline["test"]["breakdown"].items()}
    plot = bar_chart(
        out_dir / "synth.png",
        panels=[
            Panel("test queries per kind", {"queries": {k: float(v) for k, v in test_kinds.items()}}, "queries"),
            Panel(
                "image-only R@1 on test (raw pixels)",
                {"R@1 %": {"all": baseline["test"]["metrics"]["R@1"], **r1}},
                "R@1 (%)",
                reference_line=20.0,
                reference_label="gate: 20 %",
            ),
            Panel("generation speed", {"per second": {label: v["per_s"] for label, v in speeds.items()}}, "items / s", log_scale=True),
        ],
    )
    gate = baseline["test"]["metrics"]["R@1"] <= 20.0
    notes = (
        f"Config: {config.to_dict()}. Written in {write_s:.1f} s on {workers} worker(s). "
        f"Hardness gate (test image-only R@1 <= 20 %): {'PASS' if gate else 'FAIL'}."
    )
    figures = {"config": config.to_dict(), "speeds": speeds, "stats": stats, "image_only": baseline, "gate_pass": gate, "write_s": write_s}
    return BenchResult(name=NAME, figures=figures, table=table, plots=[plot], notes=notes)
