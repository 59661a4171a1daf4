"""Shared pieces of compir's benchmarks: the result type, timing, tables, plots, machine info.

A benchmark module ``benchmarks/bench_<name>.py`` exposes ``NAME: str``, ``DESCRIPTION: str`` and
``run(*, out_dir: Path, quick: bool) -> BenchResult``; :mod:`benchmarks.runner` finds it, runs
it and writes ``<name>.json``, its PNGs and ``report.md``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from compir.contracts import atomic_output_path
from compir.doctor.machine import cpu_model
from compir.doctor.report import run_checked

KEY_PACKAGES = ("numpy", "pillow", "torch", "open_clip_torch", "onnx", "onnxruntime", "onnxruntime-gpu", "usearch", "tensorrt")


@dataclass(frozen=True)
class BenchResult:
    """What one benchmark measured: JSON-able ``figures``, a markdown ``table``, PNG ``plots``."""

    name: str
    figures: dict[str, Any]
    table: str
    plots: Sequence[Path] = field(default_factory=tuple)
    notes: str = ""


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs; ``median_s`` is what benchmarks report."""

    runs_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    def rate(self, items: int) -> float:
        """Items per second at the median run."""
        return items / self.median_s if self.median_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "runs_s": list(self.runs_s)}


def time_runs(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls (caches, lazy imports)."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return Timing(tuple(runs))


def interleaved_runs(calls: Mapping[str, Callable[[], object]], *, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call per round, one call of each per round (so load from other processes on a
    shared machine hits them alike), after one warm-up call each."""
    for call in calls.values():
        call()
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            runs[name].append(time.perf_counter() - start)
    return runs


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats get 2 decimals (3 significant digits below 1)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1 else f"{value:,.2f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Panel:
    """One grouped bar chart: ``series`` maps a series label to {category: value}."""

    title: str
    series: Mapping[str, Mapping[str, float]]
    ylabel: str
    log_scale: bool = False
    reference_line: float | None = None  # e.g. chance level, drawn dashed
    reference_label: str = ""


PanelSpec = Panel | tuple[str, Mapping[str, Mapping[str, float]], str]


def bar_chart(path: Path, *, panels: Sequence[PanelSpec]) -> Path:
    """One PNG with a grouped bar chart per panel (bars of one category side by side).

    A panel is a :class:`Panel` or a ``(title, {series: {category: value}}, y label)`` tuple.
    """
    resolved = [panel if isinstance(panel, Panel) else Panel(*panel) for panel in panels]
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(resolved), figsize=(5.2 * len(resolved), 4.0), squeeze=False)
    for axis, panel in zip(axes[0], resolved, strict=True):
        categories = list(dict.fromkeys(c for values in panel.series.values() for c in values))
        width = 0.8 / max(len(panel.series), 1)
        for offset, (label, values) in enumerate(panel.series.items()):
            xs = [i + (offset - (len(panel.series) - 1) / 2) * width for i in range(len(categories))]
            axis.bar(xs, [values.get(c, 0.0) for c in categories], width=width, label=label)
        if panel.reference_line is not None:
            axis.axhline(panel.reference_line, color="black", linestyle="--", linewidth=1, label=panel.reference_label or None)
        axis.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
        axis.set_title(panel.title)
        axis.set_ylabel(panel.ylabel)
        if panel.log_scale:
            axis.set_yscale("log")
        if len(panel.series) > 1 or panel.reference_label:
            axis.legend(fontsize=8)
    return _save(figure, path)


def line_chart(path: Path, *, title: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               xlabel: str, ylabel: str) -> Path:
    """One PNG with a line per series (``{label: (xs, ys)}``)."""
    figure, axis = _pyplot().subplots(figsize=(6.4, 4.0))
    for label, (xs, ys) in series.items():
        axis.plot(list(xs), list(ys), marker=".", label=label)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_ylim(bottom=0)
    if len(series) > 1:
        axis.legend(fontsize=8)
    return _save(figure, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines and servers
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    with atomic_output_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    _pyplot().close(figure)
    return path


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python, key package versions and GPUs (via nvidia-smi)."""
    packages = {}
    for package in KEY_PACKAGES:
        try:
            packages[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    gpus = run_checked(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = _ram_gib()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_gib": round(ram, 1) if ram is not None else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "packages": packages,
        "gpus": gpus.splitlines() if gpus else [],
    }


def format_machine(info: Mapping[str, Any]) -> str:
    """Markdown bullet list of :func:`machine_info`."""
    packages = ", ".join(f"{name} {version}" for name, version in info.get("packages", {}).items())
    lines = [
        f"- CPU: {info.get('cpu')} ({info.get('cores')} cores, {info.get('cores_usable')} usable)",
        f"- RAM: {info.get('ram_gib')} GiB",
        f"- OS: {info.get('os')}; Python {info.get('python')}",
        f"- packages: {packages or 'n/a'}",
        f"- GPU: {'; '.join(info.get('gpus') or []) or 'none detected (nvidia-smi absent or failed)'}",
    ]
    return "\n".join(lines)
