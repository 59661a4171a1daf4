"""Training benchmark: the default model trained by the quickstart recipe, its training time and
its test recall (seen / unseen, per modification kind) beside the image-only and text-only
baselines on the same gallery.

Full mode is the project's goal run: ``compir quickstart`` defaults (the ``tiny`` config, a
12-minute training budget, 4000 test queries); the goal is test R@1 >= 75 % and R@10 >= 95 % on
2 CPU cores within 15 minutes in all. Quick mode trains the ``micro`` config for one minute.
Timings depend on the machine's load: ``cpu_seconds`` (process CPU time) is reported beside
wall time so runs on a shared machine can be compared.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BenchResult, Panel, bar_chart, markdown_table

NAME = "train"
DESCRIPTION = "quickstart training run: time, steps/s and test R@1/R@10 (seen/unseen/kind) vs image-only / text-only"

GOAL = {"R@1": 75.0, "R@10": 95.0}
MODES = {"composed": "composed (trained)", "image_only": "image only", "text_only": "text only"}


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    from compir.quickstart import STEPS, QuickstartState, run_quickstart

    work = out_dir / "train-work"
    state = (
        QuickstartState(out_dir=work, minutes=1.0, model="micro", n_val=120, n_test=240, progress=False)
        if quick
        else QuickstartState(out_dir=work, minutes=12.0, progress=False)
    )
    cpu_started, wall_started = time.process_time(), time.monotonic()
    summary = run_quickstart(state, steps=[step for step in STEPS if step.name in ("data", "train", "eval")])
    wall, cpu = time.monotonic() - wall_started, time.process_time() - cpu_started
    reports = json.loads(Path(summary["eval"]["path"]).read_text(encoding="utf-8"))["reports"]

    groups = ["all", *reports["composed"]["breakdown"]]
    recall = {mode: {group: _metrics(reports[mode], group) for group in groups} for mode in MODES}
    composed = reports["composed"]["metrics"]
    figures: dict[str, Any] = {
        "model": state.model,
        "budget_minutes": state.minutes,
        "cpu_count": os.cpu_count(),
        "seconds": summary["seconds"],
        "total_wall_s": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "train_steps": summary["train"]["steps"],
        "train_steps_per_s": summary["train"]["steps_per_second"],
        "test": recall,
        "goal": {**GOAL, "met": all(composed[k] >= v for k, v in GOAL.items()) and wall <= 15 * 60},
    }
    rows = [
        [group, *(recall[mode][group].get(metric, float("nan")) for mode in MODES for metric in ("R@1", "R@10"))]
        for group in groups
    ]
    header = ["group", *(f"{MODES[mode]} {metric}" for mode in MODES for metric in ("R@1", "R@10"))]
    table = markdown_table(header, rows)
    timing = (
        f"{state.model}: {figures['train_steps']} steps at {figures['train_steps_per_s']:.2f} steps/s; "
        f"total {wall / 60:.1f} min wall ({summary['seconds']}), {cpu / 60:.1f} min CPU"
    )
    plot = bar_chart(
        out_dir / "train_recall.png",
        panels=[
            Panel(f"test {metric} by group", {MODES[m]: {g: recall[m][g][metric] for g in groups} for m in MODES}, "%",
                  reference_line=GOAL[metric] if metric in GOAL else None, reference_label="goal")
            for metric in ("R@1", "R@10")
        ],
    )
    return BenchResult(name=NAME, figures=figures, table=timing + "\n\n" + table, plots=(plot,))


def _metrics(report: dict[str, Any], group: str) -> dict[str, float]:
    values = report["metrics"] if group == "all" else report["breakdown"].get(group, {})
    return {key: float(values[key]) for key in ("R@1", "R@10") if key in values}
