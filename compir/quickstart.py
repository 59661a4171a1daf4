"""``compir quickstart``: the whole pipeline on the synthetic benchmark, in one command.

A list of steps, each a library call on a shared state: render the data, train the default
model within a time budget, evaluate it on the held-out test split against the image-only /
text-only baselines, export it to ONNX (parity-checked), index the test gallery with the
torch-free runtime and answer one composed query through it (``--demo`` then opens the demo).
Stages are imported lazily: this module is part of compir's core.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compir.contracts import atomic_write_bytes
from compir.train.options import AMP_MODES  # torch-free

DEFAULT_OUT = Path("compir-quickstart")
DEFAULT_MINUTES = 13.5  # training budget; data, eval, export, index and the query add under a minute on 2 CPU cores
# Steps the default recipe needs for its README figures (measured); a machine that trains far
# fewer within the budget is told so early.
RECIPE_STEPS = 600

EPILOG = """examples:
  compir quickstart                          # ~14 minutes on 2 CPU cores
  compir quickstart --out /tmp/qs --minutes 5
  compir quickstart --model micro --minutes 1 --n-test 400   # a smoke test
  compir quickstart --steps 600              # a fixed step count: the same model on any machine

  compir quickstart --demo                   # then open the Gradio demo on the result
  compir quickstart --zero-shot              # no triplets: a CLIP on scene descriptions + Pic2Word on images (~6 min)

Everything goes under --out: data/ (the synthetic benchmark), run/ (best.pt, last.pt,
train_log.json), eval.json (test metrics), export/ (ONNX graphs + manifest.json), gallery/
(links to the test gallery's images), index/ (the usearch index) and quickstart.json (a
summary of every step).
"""


@dataclass
class QuickstartState:
    """What the steps share: settings in, paths and results out (internal to the quickstart)."""

    out_dir: Path
    minutes: float
    steps: int | None = None  # a fixed step count instead of the time budget (reproducible runs)
    amp: str = "auto"  # compir train's --amp: auto measures whether bf16 is faster here
    model: str | None = None  # None: compir train's default model
    seed: int = 0
    n_val: int = 1000
    n_test: int = 4000
    progress: bool = True
    data_dir: Path | None = None
    checkpoint: Path | None = None
    export_dir: Path | None = None
    index_dir: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    name: str
    description: str
    run: Callable[[QuickstartState], None]


def make_data(state: QuickstartState) -> None:
    from compir.data.synth import SynthConfig
    from compir.data.synth_write import write_synthetic

    folder = state.out_dir / "data"
    if (folder / "dataset.json").is_file():
        state.results["data"] = {"path": str(folder), "reused": True}
    else:
        # The written train split is for inspection only: training renders fresh scenes.
        config = SynthConfig(n_train=2000, n_val=state.n_val, n_test=state.n_test)
        summary = write_synthetic(folder, seed=state.seed, config=config)
        state.results["data"] = {"path": str(folder), "images": summary.n_images, "counts": summary.counts}
    state.data_dir = folder


def train_model(state: QuickstartState) -> None:
    from compir.train.config import DEFAULT_MODEL
    from compir.train.loop import TrainOptions, train

    assert state.data_dir is not None
    state.model = state.model or DEFAULT_MODEL
    result = train(
        TrainOptions(
            data=state.data_dir,
            out_dir=state.out_dir / "run",
            model=state.model,
            minutes=None if state.steps else state.minutes,
            steps=state.steps,
            amp=state.amp,
            expected_steps=None if state.steps else RECIPE_STEPS,
            steps_per_epoch=50,  # validate every 50 steps (a few minutes on 2 cores)
            val_queries=500,
            seed=state.seed,
            progress=state.progress,
        )
    )
    state.checkpoint = result.best_checkpoint
    if not state.steps and result.steps < 0.75 * RECIPE_STEPS:
        print(f"note: this machine trained {result.steps} steps in {state.minutes:g} minutes; the recipe reaches its "
              f"figures in ~{RECIPE_STEPS}. Recall will be lower: rerun with --minutes "
              f"{state.minutes * RECIPE_STEPS / max(1, result.steps):.0f} or --steps {RECIPE_STEPS}.")
    state.results["train"] = {
        "run": str(result.out_dir),
        "best_checkpoint": str(result.best_checkpoint),
        "steps": result.steps,
        "steps_per_second": round(result.steps_per_second, 3),
        "val": result.best_metrics,
    }


def evaluate_model(state: QuickstartState) -> None:
    from compir.evaluate import evaluate_path

    assert state.checkpoint is not None and state.data_dir is not None
    result = evaluate_path(state.checkpoint, data=state.data_dir, split="test", progress=state.progress)
    print(result.format())
    path = state.out_dir / "eval.json"
    atomic_write_bytes(path, (json.dumps(result.to_dict(), indent=1) + "\n").encode("utf-8"))
    modes = {mode: report.metrics for mode, report in result.reports.items()}  # composed and each baseline
    state.results["eval"] = {"path": str(path), "test": result.reports["composed"].metrics, **modes}


def export_model(state: QuickstartState) -> None:
    from compir.export.to_onnx import export_onnx

    assert state.checkpoint is not None
    folder = state.out_dir / "export"
    manifest = export_onnx(state.checkpoint, out_dir=folder, calibration_data=state.data_dir, overwrite=True)
    state.export_dir = folder
    state.results["export"] = {"path": str(folder), "parity_max_abs_diff": manifest.variant().parity}


def index_gallery(state: QuickstartState) -> None:
    from compir.data.load import load_split
    from compir.runtime.build import build_index
    from compir.runtime.encoder import Encoder

    assert state.export_dir is not None and state.data_dir is not None
    split = load_split(state.data_dir, split="test")
    gallery = split.link_gallery(state.out_dir / "gallery")  # the test split's targets and their siblings
    report = build_index(Encoder.from_export(state.export_dir, spinning=False), images=gallery, out=state.out_dir / "index",
                         overwrite=True, progress=state.progress)
    state.index_dir = report.out_dir
    state.results["index"] = {"path": str(report.out_dir), "items": report.count, "images_per_s": round(report.images_per_s, 1)}


def example_query(state: QuickstartState) -> None:
    from compir.data.load import load_split
    from compir.runtime.retriever import Retriever

    assert state.export_dir is not None and state.index_dir is not None and state.data_dir is not None
    query = load_split(state.data_dir, split="test").queries[0]
    retriever = Retriever.from_dirs(state.export_dir, state.index_dir)
    result = retriever.search_detailed(reference_id=query.reference, text=query.text, k=5)
    print(f"reference {query.reference!r} + {query.text!r} (target {', '.join(query.targets)}):")
    for rank, hit in enumerate(result.hits, start=1):
        mark = "  <- target" if hit.item_id in query.targets else ""
        print(f"  {rank}. {hit.item_id}  {hit.score:.3f}{mark}")
    print("latency: " + ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in result.timings_ms.items()))
    state.results["query"] = {
        "reference": query.reference, "text": query.text, "targets": list(query.targets),
        "hits": [{"item_id": h.item_id, "score": h.score} for h in result.hits], "timings_ms": result.timings_ms,
    }


STEPS: list[Step] = [
    Step("data", "render the synthetic benchmark (CIRR layout, held-out combinations in val / test)", make_data),
    Step("train", "train the model on fresh scenes every epoch, keep the best on val", train_model),
    Step("eval", "test-split metrics beside the image-only and text-only baselines", evaluate_model),
    Step("export", "ONNX graphs + manifest.json, each graph checked against torch", export_model),
    Step("index", "index the test gallery with the torch-free runtime (usearch, f16)", index_gallery),
    Step("query", "one composed query through the runtime's Retriever", example_query),
]


def run_quickstart(state: QuickstartState, *, steps: Sequence[Step] = tuple(STEPS)) -> dict[str, Any]:
    """Run ``steps`` in order, timing each; writes and returns the summary (quickstart.json)."""
    state.out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for number, step in enumerate(steps, start=1):
        print(f"\n[{number}/{len(steps)}] {step.name}: {step.description}", flush=True)
        started = time.monotonic()
        step.run(state)
        timings[step.name] = round(time.monotonic() - started, 1)
        print(f"[{number}/{len(steps)}] {step.name} done in {timings[step.name]:.0f} s", flush=True)
    summary = {"out_dir": str(state.out_dir), "minutes": state.minutes, "model": state.model, "seconds": timings, **state.results}
    atomic_write_bytes(state.out_dir / "quickstart.json", (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir quickstart",
        description="Synthetic data -> train -> evaluate -> export -> index -> one query, in about 15 minutes on 2 CPU cores.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ./%(default)s)")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"training budget (default: {DEFAULT_MINUTES}; --zero-shot: its fixed recipe's steps, about 6 minutes)")
    parser.add_argument("--steps", type=int, help="train exactly N steps instead of the time budget (reproducible)")
    parser.add_argument("--amp", choices=AMP_MODES, default="auto",
                        help="training precision (default: auto, bf16 only where a timed probe finds it faster)")
    parser.add_argument("--model", default=None, help="model config (default: compir train's default, tiny-tgcir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-val", type=int, default=1000, help="validation queries (default: %(default)s)")
    parser.add_argument("--n-test", type=int, default=4000, help="test queries (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--zero-shot", action="store_true",
                        help="zero-shot CIR: train a CLIP on images and descriptions, then Pic2Word's mapping net on images "
                             "only (no triplet), and compare with the training-free baselines")
    parser.add_argument("--demo", action="store_true", help="afterwards, serve the Gradio demo on 127.0.0.1 (Ctrl-C stops it)")
    parser.add_argument("--port", type=int, default=7860, help="demo port (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.zero_shot and args.minutes is None and args.steps is None:  # the recipe of the published figures
        from compir.quickstart_zero_shot import CLIP_RECIPE_STEPS

        args.steps = CLIP_RECIPE_STEPS
    args.minutes = DEFAULT_MINUTES if args.minutes is None else args.minutes
    if args.minutes <= 0 or (args.steps is not None and args.steps < 1):
        from compir.errors import InputError

        raise InputError(f"--minutes must be positive and --steps >= 1, got {args.minutes} / {args.steps}")
    if args.demo:  # a busy port found now, not after the whole run
        from compir.ports import check_port

        check_port(args.port)
    state = QuickstartState(
        out_dir=args.out, minutes=args.minutes, steps=args.steps, amp=args.amp, model=args.model, seed=args.seed,
        n_val=args.n_val,
        n_test=args.n_test, progress=not args.no_progress,
    )
    if args.zero_shot:
        from compir.quickstart_zero_shot import ZERO_SHOT_STEPS

        summary = run_quickstart(state, steps=ZERO_SHOT_STEPS)
    else:
        summary = run_quickstart(state)
    print("\nwhere everything went:")
    print(f"  data        {summary['data']['path']}")
    if "clip" in summary:
        print(f"  CLIP        {summary['clip']['best_checkpoint']}  (trained on images and descriptions only)")
    print(f"  checkpoint  {summary['train']['best_checkpoint']}  (last.pt and train_log.json beside it)")
    print(f"  test report {summary['eval']['path']}")
    print(f"  export      {summary['export']['path']}")
    print(f"  index       {summary['index']['path']}")
    print(f"  summary     {state.out_dir / 'quickstart.json'}")
    export, index = summary["export"]["path"], summary["index"]["path"]
    print(f"next: compir search {export} {index} --reference-id ID --text '...'   (or --reference-image IMAGE)")
    print(f"      compir serve {export} {index}     |     compir demo {export} {index} --examples {summary['data']['path']}")
    if args.demo:
        from compir.demo.launch import launch_demo

        launch_demo(export, index, port=args.port, examples_dir=summary["data"]["path"], block=True)
    return 0
