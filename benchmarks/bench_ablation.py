"""Ablation of compir's methods on the synthetic benchmark, same training budget for every composer,
several seeds.

Rows (each seed trains every composer and re-ranker anew, seed passed to training, NEUCORE and MMRef):

- the combiner in compir's form (the ``tiny`` model) and in CLIP4Cir's authors' form (``form=clip4cir``:
  raw features, text-then-image, temperature 100; their two stages, half the steps each);
- TG-CIR in compir's earlier form (the pinned ``tiny-tgcir`` config) and in the authors' form (the same
  config with the five head options at the head's defaults and the authors' distill weight): these two
  decide what ``tiny-tgcir`` should be;
- the TG-CIR form with the better **val** R@1 (per seed) + NEUCORE, + MMRef, + both. Each method's mix
  weight is chosen on val when it is trained; with both on, the two weights are chosen jointly on val
  (a grid over both, through the served chain). A row says what ran: a method whose val weight is 0
  is not applied and the row says so.

Every figure comes from the served path (:mod:`benchmarks.ablation_served`): fp32 ONNX export, the
runtime's usearch index over the test gallery, queries through the Retriever; recall from what the
index returned; latency is the whole query (reference image + text encoded, composed, index searched,
re-ranked), median over the test queries, with the re-rank's share. Each cell is the mean ± the
sample standard deviation over seeds. One JSON per finished seed lets an interrupted run resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.common import BenchResult, Panel, bar_chart, markdown_table
from compir.data.synth import SynthConfig

NAME = "ablation"
DESCRIPTION = "combiner / TG-CIR forms / + NEUCORE / + MMRef over seeds, served path: test R@1/5/10 (seen/unseen), whole-query ms"

TOP_N = 50
DATA_SEED = 11
SPREAD = "sample std over seeds"
# The five head options compir's earlier TG-CIR pinned in tiny-tgcir.json; without them the head
# takes the authors' form (compir/train/heads/tgcir.py).
EARLIER_TGCIR_OPTIONS = ("matching_labels", "detach_teacher_inputs", "shared_extractors", "image_tokens", "teacher_local_weight")
METRICS = ("R@1", "R@5", "R@10", "seen R@1", "unseen R@1", "unseen R@10")


@dataclasses.dataclass(frozen=True)
class Budget:
    name: str
    data: SynthConfig
    epochs: int
    steps: int  # per epoch
    batch_size: int
    val_queries: int
    neucore_steps: int
    mmref_steps: int
    mmref_train_queries: int
    mmref_finetune_steps: int  # used once compir.train.mmref accepts finetune_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"data": self.data.to_dict()}


# CI-sized smoke: every stage runs, the figures mean nothing.
QUICK = Budget("quick", SynthConfig(n_train=400, n_val=48, n_test=48), epochs=1, steps=4, batch_size=16, val_queries=48,
               neucore_steps=6, mmref_steps=6, mmref_train_queries=200, mmref_finetune_steps=2)
# Sized for three seeds in <= 30 minutes on a 2-core AMD EPYC (AVX-512): one seed took 7.9 minutes at one thread
# (torch and onnxruntime) on the machine shared by ~14 jobs, so three take ~24 minutes in one process and less with --jobs 2.
STANDARD = Budget("standard", SynthConfig(n_train=4000, n_val=500, n_test=1000), epochs=4, steps=35, batch_size=32, val_queries=300,
                  neucore_steps=120, mmref_steps=120, mmref_train_queries=2000, mmref_finetune_steps=40)


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str  # what actually ran in this seed


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--seeds", default="0,1,2", help="ablation: comma-separated training seeds (default: %(default)s)")
    group.add_argument("--jobs", type=int, default=1,
                       help="ablation: seeds run in this many processes, 1 thread each (default: %(default)s; 2 on a 2-core machine)")


def run(*, out_dir: Path, quick: bool, seeds: str | Sequence[int] = "0,1,2", jobs: int = 1, progress: bool = True) -> BenchResult:
    from compir.data.synth_write import write_synthetic
    from compir.errors import InputError

    chosen = _parse_seeds(seeds)
    if jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {jobs}")
    budget = QUICK if quick else STANDARD
    work = out_dir / "ablation-work" / budget.name
    data = work / "data"
    if not (data / "dataset.json").is_file():
        write_synthetic(data, seed=DATA_SEED, config=budget.data, overwrite=True, workers=1)
    started = time.perf_counter()
    todo = [seed for seed in chosen if _finished(work, seed, budget) is None]
    if jobs > 1 and len(todo) > 1:
        # spawn, not fork: a forked child would inherit this process's torch / OpenMP thread state
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=spawn, initializer=_one_thread) as pool:
            list(pool.map(_run_seed_job, [(work, data, seed, budget, slot) for slot, seed in enumerate(todo)]))
    else:
        for seed in todo:
            run_seed(work, data=data, seed=seed, budget=budget, progress=progress)
    results = [_finished(work, seed, budget) for seed in chosen]
    return _report(out_dir, [r for r in results if r is not None], budget=budget, jobs=jobs, seconds=time.perf_counter() - started)


def _parse_seeds(seeds: str | Sequence[int]) -> list[int]:
    from compir.errors import InputError

    if not isinstance(seeds, str):
        return [int(s) for s in seeds]
    try:
        parsed = [int(part) for part in seeds.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if not parsed or len(set(parsed)) != len(parsed):
        raise InputError(f"--seeds must name distinct integers, got {seeds!r}")
    return parsed


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["COMPIR_ABLATION_THREADS"] = "1"


def _run_seed_job(args: tuple[Path, Path, int, Budget, int]) -> None:
    work, data, seed, budget, slot = args
    run_seed(work, data=data, seed=seed, budget=budget, progress=False, stage_bar=slot)  # one stage bar per process


def _seed_file(work: Path, seed: int) -> Path:
    return work / f"seed-{seed}.json"


def _finished(work: Path, seed: int, budget: Budget) -> dict[str, Any] | None:
    """The seed's saved figures if it finished with this budget."""
    path = _seed_file(work, seed)
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return record if record.get("budget") == budget.to_dict() else None


# ---- one seed -----------------------------------------------------------------------------------
def run_seed(work: Path, *, data: Path, seed: int, budget: Budget, progress: bool = True, stage_bar: int | None = None) -> dict[str, Any]:
    """Train, serve and measure every row for ``seed``; write and return ``seed-<seed>.json``.

    ``progress``: every bar (stages, training, queries); ``stage_bar``: only the stage bar, at this
    terminal line (one per process with ``--jobs``)."""
    from benchmarks import ablation_served as served_path
    from compir.data.load import load_split
    from compir.train.mmref.train import WEIGHT_GRID as MMREF_GRID
    from compir.train.neucore.train import WEIGHT_GRID as NEUCORE_GRID
    from compir.train.neucore.train import train_neucore

    started = time.perf_counter()
    root = work / f"seed-{seed}"
    threads = int(os.environ.get("COMPIR_ABLATION_THREADS", "0"))
    stages = tqdm(total=13, desc=f"seed {seed}", unit="stage", disable=not progress and stage_bar is None, position=stage_bar)

    def stage(name: str) -> None:
        stages.set_postfix_str(name)
        stages.update(1)

    checkpoints: dict[str, Path] = {}
    training: dict[str, Any] = {}
    for key, train_run in _composers(root, budget).items():
        stage(f"training {key}")
        checkpoints[key], training[key] = train_run(data=data, seed=seed, progress=progress)
    best = max(("tgcir-earlier", "tgcir-authors"), key=lambda k: training[k]["val"].get("R@1", 0.0))

    stage(f"NEUCORE on {best}")
    neucore = train_neucore(checkpoints[best], data=data, steps=budget.neucore_steps, batch_size=16, top_n=TOP_N,
                            val_queries=budget.val_queries, seed=seed, progress=False)
    stage(f"MMRef on {best}")
    mmref, mmref_checkpoint = _train_mmref(checkpoints[best], data=data, budget=budget, seed=seed)
    fine_tuned = mmref_checkpoint != checkpoints[best]
    control = None
    if fine_tuned:  # MMRef fine-tuned the encoders: NEUCORE for "+ both" trains on that checkpoint
        train_neucore(mmref_checkpoint, data=data, steps=budget.neucore_steps, batch_size=16, top_n=TOP_N,
                      val_queries=budget.val_queries, seed=seed, progress=False)
        stage("control: the same fine-tune, own loss only")
        control = _train_mmref(checkpoints[best], data=data, budget=budget, seed=seed, control=root / "control")[1]

    test = load_split(data, split="test")
    val = load_split(data, split="val")
    val = dataclasses.replace(val, queries=val.queries[: budget.val_queries])
    served = {}
    for key, checkpoint in checkpoints.items():
        stage(f"export + index {key}")
        served[key] = served_path.serve(checkpoint, split=test, work=root / key, threads=threads)
    mmref_served = served[best] if not fine_tuned else served_path.serve(
        mmref_checkpoint, split=test, work=root / "mmref-finetuned", threads=threads)
    control_served = None if control is None else served_path.serve(control, split=test, work=root / "control", threads=threads)
    stage("joint weights on val")
    val_served = served_path.Served(mmref_served.export_dir, mmref_served.encoder,
                                    served_path.index_split(mmref_served.encoder, val, out=mmref_served.export_dir.parent / "index-val"))
    joint = served_path.choose_joint_weights(val_served, val, mmref_grid=MMREF_GRID, neucore_grid=NEUCORE_GRID, top_n=TOP_N)

    stage("test queries")
    rows: list[tuple[Row, Any, Any]] = [
        (Row("combiner", "combiner, compir's form (`tiny`)"), served["combiner"], None),
        (Row("combiner-clip4cir", "combiner, CLIP4Cir's authors' form (two stages)"), served["combiner-clip4cir"], None),
        (Row("tgcir-earlier", "TG-CIR, compir's earlier form (`tiny-tgcir`)"), served["tgcir-earlier"], None),
        (Row("tgcir-authors", "TG-CIR, the authors' form"), served["tgcir-authors"], None),
    ]
    if control_served is not None:
        steps = budget.mmref_finetune_steps
        rows += [
            (Row("control", f"best TG-CIR + {steps} more steps, own loss only (control for MMRef's fine-tune)"), control_served, None),
            (Row("mmref-finetuned", f"best TG-CIR + {steps} steps of MMRef's reference-guided fine-tune, no refinement"),
             mmref_served, None),
        ]
    rows += _method_rows(served[best], mmref_served, neucore_weight=neucore.weight, mmref_weight=mmref.weight, joint=joint)
    figures: dict[str, Any] = {}
    for row, where, reranker in rows:
        retrieved = served_path.retrieve(where, test, reranker=reranker, top_n=TOP_N, progress=progress, desc=row.key)
        figures[row.key] = _row_figures(row, served_path.evaluate(test, retrieved), retrieved)
    stages.close()
    record = {
        "seed": seed,
        "budget": budget.to_dict(),
        "seconds": time.perf_counter() - started,
        "threads": threads or "default",
        "training": training,
        "best_tgcir": best,
        "neucore": {"weight": neucore.weight, "val_before": neucore.val_before, "val_after": neucore.val_after},
        "mmref": {"weight": mmref.weight, "temperature": mmref.temperature, "references": mmref.references,
                  "val_before": mmref.val_before, "val_after": mmref.val_after, "fine_tuned": fine_tuned},
        "joint": {"mmref_weight": joint.mmref_weight, "neucore_weight": joint.neucore_weight, "val": joint.val_metrics, "grid": joint.grid},
        "rows": figures,
    }
    path = _seed_file(work, seed)
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


TrainRun = Any  # (data=, seed=, progress=) -> (best checkpoint, figures)


def _composers(root: Path, budget: Budget) -> dict[str, TrainRun]:
    """Every composer row's training, same total step budget."""
    authors = _authors_tgcir_config(root)

    def trained(key: str, model: str | Path, *, head_option: tuple[str, ...] = ()) -> TrainRun:
        def go(*, data: Path, seed: int, progress: bool) -> tuple[Path, dict[str, Any]]:
            if key == "combiner-clip4cir":  # the authors' two stages: towers first, then the combiner on frozen towers
                first, _ = _train(root / f"{key}-stage1", data=data, seed=seed, model=model, budget=budget, progress=progress,
                                  head_option=head_option + ("stage=clip",), steps=max(1, budget.steps // 2))
                return _train(root / key, data=data, seed=seed, model=model, budget=budget, progress=progress, init=first,
                              head_option=head_option + ("stage=combiner",), steps=max(1, budget.steps // 2))
            return _train(root / key, data=data, seed=seed, model=model, budget=budget, progress=progress, head_option=head_option)
        return go

    return {
        "combiner": trained("combiner", "tiny"),
        "combiner-clip4cir": trained("combiner-clip4cir", "tiny", head_option=("form=clip4cir",)),
        "tgcir-earlier": trained("tgcir-earlier", "tiny-tgcir"),
        "tgcir-authors": trained("tgcir-authors", authors),
    }


def _train(out: Path, *, data: Path, seed: int, model: str | Path, budget: Budget, progress: bool, head_option: tuple[str, ...] = (),
           init: Path | None = None, steps: int | None = None) -> tuple[Path, dict[str, Any]]:
    from compir.train.config import DEFAULT_MODEL
    from compir.train.loop import TrainOptions, train

    result = train(TrainOptions(
        # --init brings its own model config
        data=data, out_dir=out, model=DEFAULT_MODEL if init is not None else str(model), head_option=head_option, init=init,
        epochs=budget.epochs,
        steps_per_epoch=steps or budget.steps, batch_size=budget.batch_size, val_queries=budget.val_queries, amp="off",
        seed=seed, progress=progress,
    ))
    return result.best_checkpoint, {"steps": result.steps, "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
                                    "val": result.best_metrics}


def _authors_tgcir_config(root: Path) -> Path:
    """``tiny-tgcir`` with its five pinned head options removed (the head's defaults: the authors'
    form) and the authors' distill weight."""
    from compir.train.heads.tgcir import TgcirHead

    source = Path(__file__).resolve().parents[1] / "compir" / "model_configs" / "tiny-tgcir.json"
    config = json.loads(source.read_text(encoding="utf-8"))
    config["head"] = {k: v for k, v in config["head"].items() if k not in EARLIER_TGCIR_OPTIONS}
    config["loss_weights"]["distill"] = TgcirHead.default_loss_weights["distill"]
    config["description"] = "tiny-tgcir in the TG-CIR authors' form (the head's defaults), for the methods ablation"
    path = root / "tiny-tgcir-authors.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


def _train_mmref(checkpoint: Path, *, data: Path, budget: Budget, seed: int, control: Path | None = None) -> tuple[Any, Path]:
    """MMRef trained for ``checkpoint``, and the checkpoint its sidecar belongs to (a fine-tuned one
    when ``train_mmref`` fine-tunes the encoders). ``control``: the same fine-tune with the model's own
    loss only, written to ``control``.pt (what training longer alone gives)."""
    from compir.train.mmref import train_mmref

    extra: dict[str, Any] = {"identities": "auto", "finetune_steps": budget.mmref_finetune_steps}
    if control is not None:
        extra |= {"finetune_reference_weight": 0.0, "finetuned_checkpoint": control.with_suffix(".pt"),
                  "out": control.with_suffix(".mmref.pt")}
    result = train_mmref(checkpoint, data=data, steps=budget.mmref_steps, top_n=TOP_N, train_queries=budget.mmref_train_queries,
                         val_queries=budget.val_queries, seed=seed, progress=False, **extra)
    return result, Path(getattr(result, "checkpoint", checkpoint))


def _method_rows(tgcir: Any, mmref_served: Any, *, neucore_weight: float, mmref_weight: float, joint: Any) -> list[tuple[Row, Any, Any]]:
    """The re-rank rows, each labelled by what ran."""
    from benchmarks.ablation_served import chain

    zero = " (val chose weight 0: not applied)"
    rows = [
        (Row("+neucore", "best TG-CIR + NEUCORE" + ("" if neucore_weight > 0 else zero)), tgcir,
         chain(tgcir, mmref_weight=0.0, neucore_weight=neucore_weight)),
        (Row("+mmref", "best TG-CIR + MMRef" + ("" if mmref_weight > 0 else zero)), mmref_served,
         chain(mmref_served, mmref_weight=mmref_weight, neucore_weight=0.0)),
    ]
    on = [name for name, weight in (("MMRef", joint.mmref_weight), ("NEUCORE", joint.neucore_weight)) if weight > 0]
    off = [name for name, weight in (("MMRef", joint.mmref_weight), ("NEUCORE", joint.neucore_weight)) if weight == 0]
    label = "best TG-CIR + " + " + ".join(on) if on else "best TG-CIR"
    label += f" (both tried, joint val weights; {' and '.join(off)} at weight 0)" if off else " (joint val weights)"
    rows.append((Row("+both", label), mmref_served, chain(mmref_served, mmref_weight=joint.mmref_weight,
                                                          neucore_weight=joint.neucore_weight)))
    return rows


def _row_figures(row: Row, report: Any, retrieved: Any) -> dict[str, Any]:
    seen, unseen = report.breakdown.get("seen", {}), report.breakdown.get("unseen", {})
    metrics = {"R@1": report.metrics["R@1"], "R@5": report.metrics["R@5"], "R@10": report.metrics["R@10"],
               "seen R@1": seen.get("R@1", 0.0), "unseen R@1": unseen.get("R@1", 0.0), "unseen R@10": unseen.get("R@10", 0.0)}
    total = float(np.sum(retrieved.query_ms))
    return {"label": row.label, "metrics": metrics, "query_ms": float(np.median(retrieved.query_ms)),
            "rerank_ms": float(np.median(retrieved.rerank_ms)),
            "rerank_share": float(np.sum(retrieved.rerank_ms)) / total if total > 0 else 0.0}


# ---- report -------------------------------------------------------------------------------------
def _report(out_dir: Path, seeds: list[dict[str, Any]], *, budget: Budget, jobs: int, seconds: float) -> BenchResult:
    keys = list(seeds[0]["rows"])
    header = ["row", *METRICS, "query ms (median)", "re-rank share"]
    rows: list[list[Any]] = []
    means: dict[str, dict[str, float]] = {}
    for key in keys:
        per_seed = [seed["rows"][key] for seed in seeds]
        labels = list(dict.fromkeys(entry["label"] for entry in per_seed))
        label = labels[0] if len(labels) == 1 else " / ".join(f"{lab} [seeds {_seeds_with(seeds, key, lab)}]" for lab in labels)
        cells = [_cell([entry["metrics"][m] for entry in per_seed]) for m in METRICS]
        cells += [_cell([entry["query_ms"] for entry in per_seed]), _cell([100.0 * entry["rerank_share"] for entry in per_seed], "%")]
        rows.append([label, *cells])
        means[key] = {m: float(np.mean([entry["metrics"][m] for entry in per_seed])) for m in METRICS}
        means[key]["query_ms"] = float(np.mean([entry["query_ms"] for entry in per_seed]))
    table = markdown_table(header, rows)
    plot = bar_chart(out_dir / "ablation.png", panels=[
        Panel(f"test recall (%), mean of {len(seeds)} seed(s)", {k: {m: means[k][m] for m in ("R@1", "R@5", "R@10")} for k in keys}, "%"),
        Panel("unseen combinations (%)", {k: {m: means[k][m] for m in ("unseen R@1", "unseen R@10")} for k in keys}, "%"),
        Panel("whole query (median)", {"ms": {k: means[k]["query_ms"] for k in keys}}, "ms"),
    ])
    best = {seed["seed"]: seed["best_tgcir"] for seed in seeds}
    weights = {seed["seed"]: {"neucore": seed["neucore"]["weight"], "mmref": seed["mmref"]["weight"],
                              "joint": [seed["joint"]["mmref_weight"], seed["joint"]["neucore_weight"]]} for seed in seeds}
    notes = (
        f"Budget {budget.name!r}: {budget.epochs} x {budget.steps} steps of batch {budget.batch_size} per composer (CLIP4Cir's "
        f"form: half in each of its two stages), fp32; {budget.data.n_train} / {budget.data.n_val} / {budget.data.n_test} "
        f"synthetic train / val / test queries (data seed {DATA_SEED}); NEUCORE {budget.neucore_steps} steps, MMRef "
        f"{budget.mmref_steps} steps; top-{TOP_N}. Seeds {[seed['seed'] for seed in seeds]}; cells are mean ± {SPREAD} "
        f"(no spread with one seed). Served path: fp32 ONNX, usearch index of the test gallery, Retriever queries (no text "
        f"cache). Best TG-CIR form by val R@1 per seed: {best}; val-chosen weights per seed: {weights}. CPU: {cpu_class()}. "
        f"Wall time {seconds / 60:.1f} min ({jobs} job(s); seeds already finished were read back)."
    )
    figures = {"budget": budget.to_dict(), "seeds": seeds, "spread": SPREAD, "cpu_class": cpu_class(), "means": means}
    return BenchResult(name=NAME, figures=figures, table=table, plots=(plot,), notes=notes)


def _seeds_with(seeds: list[dict[str, Any]], key: str, label: str) -> str:
    return ",".join(str(seed["seed"]) for seed in seeds if seed["rows"][key]["label"] == label)


def _cell(values: list[float], unit: str = "") -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}{unit}"


def cpu_class() -> str:
    """The CPU model and the instruction sets that decide its speed (compir doctor's reading of /proc/cpuinfo)."""
    from compir.doctor.machine import cpu_info

    info = cpu_info()
    return f"{info.model} ({', '.join(info.features) or 'flags unknown'})"
