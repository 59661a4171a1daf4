"""The benchmark runner: discovery, JSON + report writing, failure isolation, and the synth benchmark."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from PIL import Image

from benchmarks.common import Timing, machine_info, markdown_table, time_runs
from benchmarks.runner import discover, main, run_all

GOOD = '''
from pathlib import Path
from benchmarks.common import BenchResult, Panel, bar_chart, markdown_table

NAME = "toy"
DESCRIPTION = "a toy benchmark"

def run(*, out_dir: Path, quick: bool) -> BenchResult:
    panels = [Panel("speed", {"a": {"x": 1.0, "y": 2.0}}, "items / s", log_scale=True), ("plain", {"b": {"x": 3.0}}, "n")]
    plot = bar_chart(out_dir / "toy.png", panels=panels)
    table = markdown_table(["k", "v"], [["x", 1.0]])
    return BenchResult(name=NAME, figures={"quick": quick, "x": 1.0}, table=table, plots=[plot], notes="toy notes")
'''
WITH_OPTIONS = '''
from pathlib import Path
from benchmarks.common import BenchResult

NAME = "opts"
DESCRIPTION = "a benchmark with its own option"

def add_arguments(group):
    group.add_argument("--colour", default="red", help="opts: a colour")

def run(*, out_dir: Path, quick: bool, colour: str = "red") -> BenchResult:
    return BenchResult(name=NAME, figures={"colour": colour}, table="", notes="")
'''
BROKEN = '''
NAME = "broken"
DESCRIPTION = "raises"

def run(*, out_dir, quick):
    raise RuntimeError("boom in broken")
'''


def test_runner_writes_json_png_and_report_and_isolates_failures(tmp_path, capsys):
    benches_dir = tmp_path / "benches"
    benches_dir.mkdir()
    (benches_dir / "bench_toy.py").write_text(textwrap.dedent(GOOD))
    (benches_dir / "bench_broken.py").write_text(textwrap.dedent(BROKEN))
    (benches_dir / "bench_needs_dep.py").write_text("import a_module_that_does_not_exist\n")
    benches = discover(benches_dir)
    assert set(benches) == {"toy", "broken", "needs_dep"}
    assert benches["needs_dep"].module is None and "a_module_that_does_not_exist" in benches["needs_dep"].error

    out = tmp_path / "out"
    assert run_all(benches, names=["toy", "broken"], out_dir=out, quick=True) == 1
    record = json.loads((out / "toy.json").read_text())
    assert record["format"] == "compir.bench" and record["figures"] == {"quick": True, "x": 1.0}
    assert record["plots"] == ["toy.png"] and record["machine"]["python"]
    assert Image.open(out / "toy.png").format == "PNG"
    report = (out / "report.md").read_text()
    assert "## Machine" in report and "## toy" in report and "| x | 1.00 |" in report and "![toy](toy.png)" in report
    assert "## broken (FAILED)" in report and "boom in broken" in report
    assert not (out / "broken.json").exists()

    assert main(["--list", "--dir", str(benches_dir)]) == 0
    listed = capsys.readouterr().out
    assert "toy" in listed and "a toy benchmark" in listed and "cannot import" in listed
    assert main(["nope", "--dir", str(benches_dir), "--out", str(out)]) == 2


def test_a_benchmarks_own_options_reach_its_run(tmp_path: Path) -> None:
    benches_dir = tmp_path / "benches"
    benches_dir.mkdir()
    (benches_dir / "bench_opts.py").write_text(textwrap.dedent(WITH_OPTIONS))
    (benches_dir / "bench_toy.py").write_text(textwrap.dedent(GOOD))
    out = tmp_path / "out"
    assert main(["opts", "toy", "--colour", "blue", "--dir", str(benches_dir), "--out", str(out)]) == 0
    assert json.loads((out / "opts.json").read_text())["figures"] == {"colour": "blue"}
    assert json.loads((out / "toy.json").read_text())["figures"]["x"] == 1.0  # toy takes no options and gets none


def test_helpers_time_and_format():
    timing = time_runs(lambda: sum(range(1000)), repeats=3, warmup=1)
    assert len(timing.runs_s) == 3 and timing.median_s == sorted(timing.runs_s)[1]
    assert Timing((2.0, 1.0, 4.0)).rate(10) == 5.0
    assert markdown_table(["a", "b"], [[1, 0.12345], ["x", 1234.5]]).splitlines()[2:] == ["| 1 | 0.123 |", "| x | 1,234.50 |"]
    info = machine_info()
    assert info["cores"] >= 1 and "numpy" in info["packages"]


def test_synth_benchmark_quick_run(tmp_path):
    out = tmp_path / "bench"
    assert main(["synth", "--quick", "--out", str(out)]) == 0
    record = json.loads((out / "synth.json").read_text())
    figures = record["figures"]
    assert figures["gate_pass"] is True and figures["image_only"]["test"]["metrics"]["R@1"] <= 20.0
    assert figures["stats"]["test"]["siblings_per_reference_min"] == 7
    assert all(speed["per_s"] > 0 for speed in figures["speeds"].values())
    assert Image.open(out / "synth.png").size[0] > 1000
    assert "image-only R@1" in (out / "report.md").read_text()
