"""The methods ablation's first stage and re-rank through the served path.

A checkpoint is exported (fp32 ONNX, its re-rankers added), the split's gallery is indexed by the
runtime (usearch, as ``compir index build`` does over a folder of the gallery's images), and every
query goes through :class:`~compir.runtime.retriever.Retriever`: the reference image is decoded and
encoded, the text tokenized and encoded (no text cache), both composed, the index searched and the
top-N re-ranked. Recall is computed from the hits the index returned, nothing else; latency is the
whole query's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from compir.data.types import CirSplit
from compir.metrics import EvalReport
from compir.runtime.encoder import Encoder
from compir.runtime.gallery import Gallery
from compir.runtime.rerank import RerankCandidates, Reranker, RerankQuery
from compir.runtime.rerankers import MethodsReranker
from compir.runtime.rerankers.mmref import MMRefStage
from compir.runtime.rerankers.neucore import NeucoreStage
from compir.runtime.rerankers.settings import reranker_settings

# Score of a gallery item the index did not return: below every returned score, finite (the
# protocol multiplies the score matrix by an identity, and -inf * 0 would be NaN).
NOT_RETURNED = -1e9


@dataclass(frozen=True)
class Served:
    """An export and the runtime index of one split's gallery, built with that export."""

    export_dir: Path
    encoder: Encoder
    gallery: Gallery

    def regions(self) -> bool:
        """Whether the cached image features carry NEUCORE's image regions (a vector head's export)."""
        return int(reranker_settings(self.export_dir, self.encoder.manifest).get("neucore", {}).get("region_grid", 0)) > 0

    def stages(self) -> tuple[MMRefStage | None, NeucoreStage | None]:
        """The export's MMRef and NEUCORE stages at their validation-chosen weights, weight 0 included."""
        settings = reranker_settings(self.export_dir, self.encoder.manifest)
        mmref = MMRefStage.from_export(self.export_dir, self.encoder.manifest, settings["mmref"]) if "mmref" in settings else None
        neucore = (NeucoreStage.from_export(self.encoder, self.export_dir, self.encoder.manifest, self.encoder.variant, settings["neucore"])
                   if "neucore" in settings else None)
        return mmref, neucore


@dataclass(frozen=True)
class Retrieved:
    """What the served path returned for a split's queries."""

    scores: np.ndarray  # (Q, G) over split.gallery: the returned hits' scores, NOT_RETURNED elsewhere
    query_ms: np.ndarray  # (Q,) whole query: encode reference + text, compose, search, re-rank
    rerank_ms: np.ndarray  # (Q,) the re-rank stage alone (0 without a re-ranker)


@dataclass
class _Recorder:
    """A re-ranker that keeps the first stage's order and records what the Retriever hands it."""

    name: str = "recorder"
    calls: list[tuple[RerankQuery, RerankCandidates]] = field(default_factory=list)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> np.ndarray:
        self.calls.append((query, candidates))
        return np.asarray(candidates.scores, dtype=np.float32)


def serve(checkpoint: Path, *, split: CirSplit, work: Path, threads: int = 0, progress: bool = False) -> Served:
    """Export ``checkpoint`` (fp32, with the re-ranker sidecars beside it) into ``work/export`` and
    index ``split``'s gallery into ``work/index-<split>``."""
    from compir.export.rerankers import add_rerankers
    from compir.export.to_onnx import export_onnx

    export = work / "export"
    # Every re-ranker, weight 0 included: the joint weights are chosen again on val.
    export_onnx(checkpoint, out_dir=export, overwrite=True, calibration_count=8, keep_unapplied=True)
    add_rerankers(export, checkpoint=checkpoint, keep_unapplied=True)
    encoder = Encoder.from_export(export, providers=["cpu"], threads=threads)
    return Served(export, encoder, index_split(encoder, split, out=work / f"index-{split.name}", progress=progress))


def index_split(encoder: Encoder, split: CirSplit, *, out: Path, progress: bool = False) -> Gallery:
    """The runtime index of ``split.gallery`` (its images linked into a folder, then ``build_index``)."""
    from compir.runtime.build import build_index

    images = split.link_gallery(out.parent / f"gallery-{split.name}")
    build_index(encoder, images=images, out=out, overwrite=True, workers=1, progress=progress)
    return Gallery.load(out, encoder=encoder.fingerprint, manifest_sha256=encoder.manifest_sha256)


def retrieve(served: Served, split: CirSplit, *, reranker: Reranker | None, top_n: int, progress: bool = False,
             desc: str = "querying") -> Retrieved:
    """Run every query of ``split`` through a Retriever over ``served`` (top ``top_n`` hits, re-ranked
    when ``reranker`` is given)."""
    from compir.runtime.retriever import Retriever

    retriever = Retriever(served.encoder, served.gallery, reranker=reranker, rerank_top_n=top_n, text_cache_size=0)
    column = {name: i for i, name in enumerate(split.gallery)}
    scores = np.full((len(split.queries), len(split.gallery)), NOT_RETURNED, dtype=np.float32)
    query_ms = np.zeros(len(split.queries))
    rerank_ms = np.zeros(len(split.queries))
    for row, query in enumerate(tqdm(split.queries, desc=desc, unit="query", disable=not progress, leave=False)):
        start = time.perf_counter()
        result = retriever.search_detailed(text=query.text, reference_image=split.image_path(query.reference), k=top_n,
                                           rerank=reranker is not None)
        query_ms[row] = 1000.0 * (time.perf_counter() - start)
        rerank_ms[row] = result.timings_ms.get("rerank", 0.0)
        for hit in result.hits:
            scores[row, column[hit.item_id]] = hit.score
    return Retrieved(scores, query_ms, rerank_ms)


def evaluate(split: CirSplit, retrieved: Retrieved) -> EvalReport:
    """The split's protocol on what the index returned."""
    from compir.train.neucore.stage2 import evaluate_scores

    return evaluate_scores(split, retrieved.scores)


@dataclass(frozen=True)
class JointChoice:
    """Both re-rankers' weights chosen together on val, and the val metrics they give."""

    mmref_weight: float
    neucore_weight: float
    val_metrics: dict[str, float]
    grid: list[dict[str, Any]]  # every (mmref, neucore, score) tried


def choose_joint_weights(served: Served, val: CirSplit, *, mmref_grid: Sequence[float], neucore_grid: Sequence[float],
                         top_n: int, progress: bool = False) -> JointChoice:
    """The (MMRef, NEUCORE) weights of the two grids whose chain, as served, scores best on ``val``
    (ties: the smaller weights; MMRef at its own validation-chosen temperature). The val queries go
    through the Retriever once; every grid point re-scores the same candidates."""
    from compir.train.evaluation import selection_score

    mmref, neucore = served.stages()
    if mmref is None or neucore is None:
        raise ValueError(f"export {served.export_dir} lacks MMRef or NEUCORE settings")
    methods = MethodsReranker(mmref=mmref, neucore=neucore, regions=served.regions())  # the runtime's candidate vectors
    recorder = _Recorder()
    retrieve(served, val, reranker=recorder, top_n=top_n, progress=progress, desc="val (joint weights)")
    column = {name: i for i, name in enumerate(val.gallery)}
    calls = [(query, candidates, [column[item] for item in candidates.item_ids]) for query, candidates in recorder.calls]
    joint = []
    for query, candidates, _ in calls:
        assert query.reference_features is not None  # composed queries: the Retriever encoded the reference image
        joint.append(neucore.scores(query.text, query.input_ids, query.reference_features, candidates.image_features))
    best: tuple[float, float, float, dict[str, float]] | None = None
    grid: list[dict[str, Any]] = []
    for mmref_weight in sorted(mmref_grid):
        mmref.weight = mmref_weight
        refined = [mmref.refine(q.query_embeds, methods.mmref_vectors(c.image_features), np.asarray(c.scores, np.float64))
                   for q, c, _ in calls]
        for neucore_weight in sorted(neucore_grid):
            scores = np.full((len(val.queries), len(val.gallery)), NOT_RETURNED, dtype=np.float32)
            for row, ((_, _, columns), first, extra) in enumerate(zip(calls, refined, joint, strict=True)):
                scores[row, columns] = first + neucore_weight * extra  # MethodsReranker's mix
            report = evaluate(val, Retrieved(scores, np.zeros(0), np.zeros(0)))
            score = selection_score(report)
            grid.append({"mmref": mmref_weight, "neucore": neucore_weight, "score": score})
            if best is None or score > best[0]:
                best = (score, mmref_weight, neucore_weight, dict(report.metrics))
    assert best is not None
    return JointChoice(best[1], best[2], best[3], grid)


def chain(served: Served, *, mmref_weight: float, neucore_weight: float) -> Reranker | None:
    """The served re-ranker with the given weights; a method at weight 0 is left out (as the runtime
    does), None when both are."""
    mmref, neucore = served.stages()
    if mmref is not None:
        mmref.weight = mmref_weight
    if neucore is not None:
        neucore.weight = neucore_weight
    mmref = mmref if mmref_weight > 0 else None
    neucore = neucore if neucore_weight > 0 else None
    return None if mmref is None and neucore is None else MethodsReranker(mmref=mmref, neucore=neucore, regions=served.regions())
