"""``compir bench``: find the benchmark modules, run them, write JSON + PNG + one report.md.

Each ``benchmarks/bench_<name>.py`` exposes ``NAME``, ``DESCRIPTION`` and
``run(*, out_dir, quick) -> BenchResult`` (see :mod:`benchmarks.common`); one with options of its own
also exposes ``add_arguments(group)`` (argparse) and takes them in ``run``. Results are written to
``<out>/<name>.json`` (format ``compir.bench``); ``report.md`` is rebuilt from every result JSON in
the folder, so benchmarks run one at a time still end up in one report.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.common import BenchResult, format_machine, machine_info
from compir.contracts import atomic_write_bytes, write_contract

BENCH_FORMAT = "compir.bench"
BENCH_SCHEMA = 1
REPORT_FILE = "report.md"

EPILOG = """examples:
  compir bench --list                     # the benchmarks and what they measure
  compir bench synth --quick              # one benchmark, small sizes (seconds)
  compir bench --out bench-results        # all of them; JSON + PNG + report.md in bench-results/
  compir bench coverage --offline-standins on --hub-only   # a benchmark's own options (listed below)
  compir bench ablation --seeds 0,1,2 --jobs 2   # the methods ablation, three seeds in two processes (resumes by seed)
"""


@dataclass(frozen=True)
class BenchModule:
    """A discovered benchmark: its name, description and module (None if it failed to import)."""

    name: str
    description: str
    module: ModuleType | None
    error: str = ""


def _import(path: Path) -> ModuleType:
    if path.parent.resolve() == Path(__file__).parent.resolve():
        return importlib.import_module(f"benchmarks.{path.stem}")
    # a benchmark folder outside the package (tests, plug-ins): load the file under a private name
    spec = importlib.util.spec_from_file_location(f"_compir_bench_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def discover(folder: Path | None = None) -> dict[str, BenchModule]:
    """Every ``bench_*.py`` in ``folder`` (default: beside this file), by NAME.

    A module that fails to import is kept with its error, so one missing optional dependency
    does not hide the other benchmarks.
    """
    folder = folder or Path(__file__).parent
    found: dict[str, BenchModule] = {}
    for path in sorted(folder.glob("bench_*.py")):
        stem_name = path.stem.removeprefix("bench_")
        try:
            module = _import(path)
        except Exception as exc:  # an optional dependency missing must not hide the other benchmarks
            found[stem_name] = BenchModule(stem_name, "", None, f"{type(exc).__name__}: {exc}")
            continue
        name = getattr(module, "NAME", stem_name)
        found[name] = BenchModule(name, str(getattr(module, "DESCRIPTION", "")), module)
    return found


def run_benchmark(bench: BenchModule, *, out_dir: Path, quick: bool, machine: dict[str, Any],
                  options: dict[str, Any] | None = None) -> BenchResult:
    """Run one benchmark (with its own ``options``) and write ``<result name>.json`` (the benchmark's
    name, or a part's: ``coverage-2of3`` for a shard); raises what the benchmark raises."""
    if bench.module is None:
        raise RuntimeError(f"benchmark {bench.name!r} cannot be imported: {bench.error}")
    start = time.perf_counter()
    result = bench.module.run(out_dir=out_dir, quick=quick, **(options or {}))
    elapsed = time.perf_counter() - start
    if not isinstance(result, BenchResult):
        raise TypeError(f"benchmark {bench.name!r} returned {type(result).__name__}, not BenchResult")
    write_contract(
        out_dir / f"{result.name}.json",
        fmt=BENCH_FORMAT,
        schema_version=BENCH_SCHEMA,
        body={
            "name": result.name,
            "description": bench.description,
            "quick": quick,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "elapsed_s": round(elapsed, 3),
            "machine": machine,
            "figures": result.figures,
            "table": result.table,
            "plots": [_relative(Path(p), out_dir) for p in result.plots],
            "notes": result.notes,
        },
    )
    return result


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _load_results(out_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(out_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("format") == BENCH_FORMAT:
            records.append(record)
    return records


def write_report(out_dir: Path, *, machine: dict[str, Any], failures: dict[str, str]) -> Path:
    """Rebuild ``report.md`` from every result JSON in ``out_dir`` plus this run's failures."""
    lines = ["# compir benchmarks", "", "## Machine", "", format_machine(machine), ""]
    for record in _load_results(out_dir):
        lines += [f"## {record['name']}", "", record.get("description", ""), ""]
        mode = "quick" if record.get("quick") else "full"
        lines.append(f"_{mode} run, finished {record.get('finished_utc')}, {record.get('elapsed_s')} s_")
        if record.get("machine") != machine:
            lines.append(f"\n_ran on another machine:_\n\n{format_machine(record.get('machine') or {})}")
        lines += ["", record.get("table", ""), ""]
        lines += [f"![{record['name']}]({plot})" for plot in record.get("plots", [])]
        if record.get("notes"):
            lines += ["", record["notes"]]
        lines.append("")
    for name, error in failures.items():
        lines += [f"## {name} (FAILED)", "", "```", error.strip(), "```", ""]
    path = out_dir / REPORT_FILE
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


def _parser(benches: dict[str, BenchModule] | None = None) -> tuple[argparse.ArgumentParser, dict[str, list[str]]]:
    """The parser, with each benchmark's own options in a group; and the option names (dests) per benchmark."""
    parser = argparse.ArgumentParser(
        prog="compir bench",
        description="Run compir's benchmarks (benchmarks/bench_*.py): JSON + PNG per benchmark and one report.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--out", default="bench-results", help="output folder (default: bench-results/)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run in seconds")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--dir", type=Path, default=None, help="folder of bench_*.py files (default: compir's benchmarks/)")
    dests: dict[str, list[str]] = {}
    for bench in (benches or {}).values():
        add = getattr(bench.module, "add_arguments", None)
        if add is not None:
            group = parser.add_argument_group(f"{bench.name} options")
            add(group)
            dests[bench.name] = [action.dest for action in group._group_actions]
    return parser, dests


def build_parser(bench_dir: Path | None = None) -> argparse.ArgumentParser:
    """``compir bench``'s parser with the options of every benchmark found in ``bench_dir`` (default: compir's)."""
    return _parser(discover(bench_dir))[0]


def main(argv: Sequence[str] | None = None) -> int:
    first = argparse.ArgumentParser(add_help=False)  # --dir first: it says whose options to add
    first.add_argument("--dir", type=Path, default=None)
    benches = discover(first.parse_known_args(argv)[0].dir)
    parser, dests = _parser(benches)
    args = parser.parse_args(argv)
    if args.list:
        for bench in benches.values():
            print(f"{bench.name:<16} {bench.description or '(cannot import: ' + bench.error + ')'}")
        return 0
    unknown = [name for name in args.names if name not in benches]
    if unknown:
        print(f"compir bench: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(benches)}")
        return 2
    options = {name: {dest: getattr(args, dest) for dest in names} for name, names in dests.items()}
    return run_all(benches, names=args.names or list(benches), out_dir=Path(args.out), quick=args.quick, options=options)


def run_all(benches: dict[str, BenchModule], *, names: Sequence[str], out_dir: Path, quick: bool,
            options: dict[str, dict[str, Any]] | None = None) -> int:
    """Run ``names`` in order, write their JSONs and report.md; 1 if any failed, else 0."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    failures: dict[str, str] = {}
    for name in names:
        print(f"== {name}", flush=True)
        try:
            result = run_benchmark(benches[name], out_dir=out_dir, quick=quick, machine=machine, options=(options or {}).get(name))
        except Exception:  # one failing benchmark is reported, the others still run
            failures[name] = traceback.format_exc()
            print(f"{name} FAILED:\n{failures[name]}", flush=True)
            continue
        print(result.table, flush=True)
    report = write_report(out_dir, machine=machine, failures=failures)
    print(f"report: {report}")
    return 1 if failures else 0
