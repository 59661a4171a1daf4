"""Ablation of compir's methods on the synthetic benchmark, same training budget for every model.

Rows: the CLIP4Cir combiner; TG-CIR; TG-CIR + NEUCORE re-rank; TG-CIR + MMRef refinement; TG-CIR
+ both. Both composers train the same number of steps at the same batch size (a step budget, not
a time budget, because the machine is shared and wall time is noisy); the re-rankers train on the
frozen TG-CIR checkpoint and take their mix weights from the **validation** split; every figure
in the table is on the **test** split (seen and unseen attribute combinations). Re-ranking runs
through the served path: the export's ONNX ``reranker`` graph and MMRef matrices via
:mod:`compir.runtime.rerankers`, on the first stage's top-N; its added latency per query is the
median over the test queries. MMRef is also measured on text -> image retrieval (scene
descriptions as queries).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchResult, Panel, bar_chart, markdown_table
from compir.data.synth import SynthConfig
from compir.data.types import CirSplit, Query

NAME = "ablation"
DESCRIPTION = "combiner vs TG-CIR vs TG-CIR + NEUCORE / MMRef re-ranking: test R@1/5/10 (seen/unseen) and added latency"

TOP_N = 50


@dataclasses.dataclass(frozen=True)
class Budget:
    data: SynthConfig
    steps: int
    batch_size: int
    epochs: int
    val_queries: int
    neucore_steps: int
    mmref_steps: int
    mmref_train_queries: int


QUICK = Budget(SynthConfig(n_train=2000, n_val=240, n_test=480), steps=30, batch_size=32, epochs=3, val_queries=240,
               neucore_steps=60, mmref_steps=150, mmref_train_queries=1000)
FULL = Budget(SynthConfig(n_train=20000, n_val=1000, n_test=2000), steps=200, batch_size=64, epochs=5, val_queries=1000,
              neucore_steps=400, mmref_steps=400, mmref_train_queries=6000)


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    from compir.data.load import load_split
    from compir.data.synth_write import write_synthetic
    from compir.train.loop import TrainOptions, train
    from compir.train.mmref import train_mmref
    from compir.train.neucore.train import train_neucore

    budget = QUICK if quick else FULL
    work = out_dir / "ablation-work"
    data = work / "data"
    if not (data / "dataset.json").is_file():
        write_synthetic(data, seed=11, config=budget.data, overwrite=True, workers=1)
    checkpoints, train_figures = {}, {}
    for label, model in (("combiner", "tiny"), ("tgcir", "tiny-tgcir")):
        started = time.perf_counter()
        result = train(TrainOptions(
            data=data, out_dir=work / label, model=model, epochs=budget.epochs, steps_per_epoch=budget.steps,
            batch_size=budget.batch_size, val_queries=budget.val_queries, progress=False, seed=0,
        ))
        checkpoints[label] = result.best_checkpoint
        train_figures[label] = {"steps": result.steps, "seconds": time.perf_counter() - started, "val": result.best_metrics}
    tgcir = checkpoints["tgcir"]
    neucore = train_neucore(tgcir, data=data, steps=budget.neucore_steps, batch_size=16, val_queries=budget.val_queries, progress=False)
    mmref = train_mmref(tgcir, data=data, steps=budget.mmref_steps, train_queries=budget.mmref_train_queries,
                        val_queries=budget.val_queries, progress=False)
    test = load_split(data, split="test")
    rows, figures = _evaluate(checkpoints, test, work=work)
    figures |= {
        "budget": dataclasses.asdict(budget) | {"data": budget.data.to_dict()},
        "training": train_figures,
        "neucore": {"weight": neucore.weight, "val_before": neucore.val_before, "val_after": neucore.val_after},
        "mmref": {"weight": mmref.weight, "temperature": mmref.temperature, "references": mmref.references,
                  "val_before": mmref.val_before, "val_after": mmref.val_after},
    }
    header = ["model", "R@1", "R@5", "R@10", "seen R@1", "unseen R@1", "unseen R@10", "added ms/query"]
    table = markdown_table(header, rows)
    text_rows = [[k, v["R@1"], v["R@10"]] for k, v in figures["text_to_image"].items()]
    table += "\n\ntext -> image (scene descriptions -> test gallery):\n\n" + markdown_table(["model", "R@1", "R@10"], text_rows)
    plot = bar_chart(out_dir / "ablation.png", panels=[
        Panel("test recall (%)", {row[0]: {"R@1": row[1], "R@5": row[2], "R@10": row[3]} for row in rows}, "%"),
        Panel("unseen combinations (%)", {row[0]: {"R@1": row[5], "R@10": row[6]} for row in rows}, "%"),
        Panel("added latency per query", {"ms": {row[0]: row[7] for row in rows}}, "ms (median)"),
    ])
    notes = (
        f"Same budget: {budget.epochs} x {budget.steps} steps of batch {budget.batch_size} per composer; re-rankers on the frozen "
        f"TG-CIR checkpoint, top-{TOP_N}; weights chosen on val (NEUCORE {neucore.weight}, MMRef {mmref.weight} at "
        f"temperature {mmref.temperature}); a weight of 0 means the method did not help on val. Figures: test split."
    )
    return BenchResult(name=NAME, figures=figures, table=table, plots=(plot,), notes=notes)


def _evaluate(checkpoints: dict[str, Path], test: CirSplit, *, work: Path) -> tuple[list[list[Any]], dict[str, Any]]:
    from compir.export.rerankers import add_rerankers
    from compir.export.to_onnx import export_onnx
    from compir.runtime.encoder import Encoder
    from compir.runtime.rerankers import load_methods_reranker
    from compir.train.checkpoint import load_checkpoint
    from compir.train.neucore.stage2 import encode_for_stage2, evaluate_scores, first_stage_scores

    rows: list[list[Any]] = []
    reports: dict[str, Any] = {}
    encoded = {label: encode_for_stage2(load_checkpoint(path).model, test, progress=False) for label, path in checkpoints.items()}
    for label in ("combiner", "tgcir"):
        first = first_stage_scores(encoded[label])
        reports[label] = evaluate_scores(test, first)
        rows.append(_row(label, reports[label], 0.0))
    export = work / "tgcir-export"
    export_onnx(checkpoints["tgcir"], out_dir=export, overwrite=True, calibration_count=8)
    add_rerankers(export, checkpoint=checkpoints["tgcir"])
    encoder = Encoder.from_export(export, providers=["cpu"])
    stages = load_methods_reranker(encoder, encoder.manifest, encoder.variant)
    tg = encoded["tgcir"]
    first = first_stage_scores(tg)
    text_figures = _text_to_image(tg, test, stages, checkpoint=checkpoints["tgcir"])
    for label, mmref_on, neucore_on in (("tgcir + neucore", False, True), ("tgcir + mmref", True, False), ("tgcir + both", True, True)):
        chain, off = _chain(stages, mmref=mmref_on, neucore=neucore_on)
        shown = label + "".join(f" ({name} off: weight 0)" for name in off)
        if chain is None:  # every requested method got weight 0 on val: nothing is served
            reports[label] = reports["tgcir"]
            rows.append(_row(shown, reports["tgcir"], 0.0))
            continue
        scores, latency = _rerank_split(tg, first, chain)
        reports[label] = evaluate_scores(test, scores)
        rows.append(_row(shown, reports[label], latency))
    figures = {"test": {label: report.to_dict() for label, report in reports.items()}, "text_to_image": text_figures}
    return rows, figures


def _row(label: str, report: Any, latency_ms: float) -> list[Any]:
    seen, unseen = report.breakdown.get("seen", {}), report.breakdown.get("unseen", {})
    m = report.metrics
    return [label, m["R@1"], m["R@5"], m["R@10"], seen.get("R@1", 0.0), unseen.get("R@1", 0.0), unseen.get("R@10", 0.0), latency_ms]


def _chain(stages: Any, *, mmref: bool, neucore: bool) -> tuple[Any, list[str]]:
    """The served reranker restricted to the requested methods, and the requested ones that are off."""
    from compir.runtime.rerankers import MethodsReranker

    have_mmref = stages is not None and stages.mmref is not None
    have_neucore = stages is not None and stages.neucore is not None
    off = [name for name, wanted, have in (("mmref", mmref, have_mmref), ("neucore", neucore, have_neucore)) if wanted and not have]
    if not ((mmref and have_mmref) or (neucore and have_neucore)):
        return None, off
    return MethodsReranker(mmref=stages.mmref if mmref else None, neucore=stages.neucore if neucore else None), off


def _rerank_split(encoded: Any, first: np.ndarray, chain: Any) -> tuple[np.ndarray, float]:
    """Re-rank every test query's top-N through the runtime reranker; (scores, median ms/query)."""
    from compir.runtime.rerank import RerankCandidates, RerankQuery
    from compir.train.neucore.stage2 import candidate_columns, rerank_matrix

    columns = candidate_columns(encoded, first, top_n=TOP_N)
    gallery_rows = np.asarray(encoded.gallery_rows)
    times: list[float] = []

    def rescore(q: int, cols: np.ndarray, scores: np.ndarray) -> np.ndarray:
        reference = encoded.image_features[encoded.image_row[encoded.split.queries[q].reference]]
        query = RerankQuery(text=encoded.split.queries[q].text, input_ids=encoded.input_ids[q], text_features=np.zeros(0),
                            reference_features=reference, query_embeds=encoded.query_embeds[q])
        candidates = RerankCandidates(item_ids=tuple(str(c) for c in cols), image_features=encoded.image_features[gallery_rows[cols]],
                                      image_paths=tuple(None for _ in cols), scores=scores.astype(np.float32))
        start = time.perf_counter()
        out = chain.rerank(query, candidates)
        times.append(time.perf_counter() - start)
        return np.asarray(out)

    return rerank_matrix(first, columns, rescore), 1000.0 * float(np.median(times))


def _text_to_image(encoded: Any, test: CirSplit, stages: Any, *, checkpoint: Path) -> dict[str, dict[str, float]]:
    """Scene descriptions as text-only queries over the test gallery, with and without MMRef."""
    import torch

    from compir.runtime.rerank import RerankCandidates, RerankQuery
    from compir.train.checkpoint import load_checkpoint
    from compir.train.neucore.stage2 import evaluate_scores, rerank_matrix
    from compir.train.text import tokenize

    names = [name for name in test.gallery if test.captions.get(name)]
    split = dataclasses.replace(
        test, protocol="shoes", queries=tuple(Query(query_id=n, reference="", text=test.captions[n][0], targets=(n,)) for n in names)
    )
    model = load_checkpoint(checkpoint).model
    with torch.no_grad():
        texts = model.encode_text(tokenize([q.text for q in split.queries], context_length=model.context_length))[0].float().numpy()
    gallery = encoded.image_embeds[encoded.gallery_rows]
    first = (texts @ gallery.T).astype(np.float32)
    out = {"tgcir": dict(evaluate_scores(split, first).metrics)}
    if stages is not None and stages.mmref is not None:
        columns = [np.argsort(-row, kind="stable")[:TOP_N] for row in first]

        def rescore(q: int, cols: np.ndarray, scores: np.ndarray) -> np.ndarray:
            query = RerankQuery(text="", input_ids=np.zeros(1, np.int64), text_features=np.zeros(0), reference_features=None,
                                query_embeds=texts[q])
            candidates = RerankCandidates(item_ids=(), image_features=gallery[cols], image_paths=(), scores=scores)
            return np.asarray(stages.mmref.refine(query.query_embeds, candidates.image_features, candidates.scores))

        out["tgcir + mmref"] = dict(evaluate_scores(split, rerank_matrix(first, columns, rescore)).metrics)
    return out
