"""Gallery search: usearch HNSW (f16) against exact numpy search and against faiss-cpu HNSW.

Data: L2-normalised 512-d vectors drawn around Gaussian centres (~500 per centre: 2,000 at 1M) (clustered like real
embeddings, so neighbours are close calls; uniform noise would flatter every ANN index), with
held-out queries from the same mixture. Ground truth is the exact top-10 by cosine.

- exact: batched numpy matmul + argpartition over the whole gallery (BLAS on all cores);
- usearch: f16 storage, connectivity 16, expansion_add 128, a sweep over expansion_search;
- faiss: IndexHNSWFlat (f32, inner product), M 16, efConstruction 128, a sweep over efSearch.
- milvus (when the milvus extra is installed): compir's Milvus store on Milvus Lite (an embedded
  file), HNSW M 16, efConstruction 128 (Milvus Lite builds it with faiss IndexHNSWFlat, f32, per
  segment of <= 100k rows), a sweep over ef, and FLAT (Milvus Lite's brute force); queries go
  through pymilvus over gRPC as in serving. Its gallery is the first 100k vectors at most
  (COMPIR_BENCH_INDEX_MILVUS_VECTORS=N; 0 leaves Milvus out), compared with exact and usearch on
  the same vectors.
Goal: usearch recall@10 >= 0.98 at >= 20x the exact queries/s. faiss and usearch are compared
at equal recall (the fastest sweep point of each that reaches 0.95 / 0.98 / 0.99).
Full: 1M vectors (about 5 GB of RAM in all); --quick: 100k (Milvus: 20k); COMPIR_BENCH_INDEX_VECTORS=N sets N;
COMPIR_BENCH_INDEX_FAISS=0 leaves faiss out (its 1M build takes as long as usearch's on 2 cores).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchResult, Panel, bar_chart, markdown_table
from compir.runtime.index import HnswConfig

NAME = "index"
DESCRIPTION = ("usearch (each storage type, --dtype auto's choice) vs faiss HNSWFlat vs exact numpy vs Milvus Lite: recall@10, "
               "queries/s one query per call at 1 thread, and memory, on clustered 512-d vectors")
DIM = 512
K = 10
SWEEP = (16, 24, 32, 48, 64, 128, 256, 512)  # 1M clustered vectors need ef > 128 for recall 0.98
RECALL_LEVELS = (0.95, 0.98, 0.99)
SIZE_VARIABLE = "COMPIR_BENCH_INDEX_VECTORS"  # overrides the gallery size (e.g. on a shared machine)
FAISS_VARIABLE = "COMPIR_BENCH_INDEX_FAISS"  # "0": usearch against exact only
MILVUS_VARIABLE = "COMPIR_BENCH_INDEX_MILVUS_VECTORS"  # Milvus Lite gallery size (default: up to 100k); "0": no Milvus rows
MILVUS_MAX = 100_000
MILVUS_QUICK = 20_000  # Milvus Lite's graph build dominates --quick otherwise
# e.g. "f16,i8": the usearch storage types measured (default: all with --quick, auto's choice in full)
DTYPES_VARIABLE = "COMPIR_BENCH_INDEX_DTYPES"
FAISS_LABEL = "faiss HNSWFlat f32, ip"


def clustered_vectors(count: int, *, seed: int, centres: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """(count, DIM) float32 unit vectors around ``centres`` (built in chunks to bound memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, DIM), dtype=np.float32)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        picks = centres[rng.integers(0, len(centres), stop - start)]
        block = picks + rng.normal(scale=0.03, size=(stop - start, DIM)).astype(np.float32)  # noise norm ~0.7
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_top_k(base: np.ndarray, queries: np.ndarray, *, k: int = K, chunk: int = 100_000) -> np.ndarray:
    """Exact (Q, k) row indices by cosine: chunked matmul, per-chunk argpartition, merge."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(base), chunk):
        scores = queries @ base[start : start + chunk].T  # (Q, chunk)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged_rows = np.concatenate([best_rows, top + start], axis=1)
        keep = np.argpartition(-merged_scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, keep, 1)
        best_rows = np.take_along_axis(merged_rows, keep, 1)
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_rows, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(last result, median seconds) of ``repeats`` runs after one warm-up."""
    result = fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
    return result, float(np.median(runs))


@dataclass
class _Built:
    """An index ready to search one query at a time at breadth ``ef``."""

    figures: dict[str, Any]  # build_s, memory_mb, ... (the sweep is added by _sweep)
    search: Callable[[np.ndarray, int], np.ndarray]  # (query (D,), ef) -> (K,) rows, -1 padded


def _sweep(built: dict[str, _Built], queries: np.ndarray, truth: np.ndarray, repeats: int) -> None:
    """Recall and queries/s of every index at every ef, one query per call; the indexes take turns within each
    repeat, so a change in the machine's load falls on all of them alike. Adds ``sweep`` to each's figures."""
    for entry in built.values():
        entry.figures["sweep"] = []
    for ef in SWEEP:
        seconds: dict[str, list[float]] = {name: [] for name in built}
        for entry in built.values():  # warm-up pass: the recall
            found = np.stack([entry.search(query, ef) for query in queries])
            entry.figures["sweep"].append({"setting": ef, "recall": recall_at_k(found, truth)})
        for _ in range(repeats):
            for name, entry in built.items():
                start = time.perf_counter()
                for query in queries:
                    entry.search(query, ef)
                seconds[name].append(time.perf_counter() - start)
        for name, entry in built.items():
            entry.figures["sweep"][-1]["qps"] = len(queries) / float(np.median(seconds[name]))


def _usearch(base: np.ndarray, *, dtype: str, metric: str) -> _Built:
    """A usearch graph (compir's settings) of ``dtype`` under ``metric``, built on every core, searched on one."""
    from usearch.index import Index

    from compir.runtime.ann_dtype import fill

    hnsw = HnswConfig()
    index = Index(ndim=DIM, metric=metric, dtype=dtype, connectivity=hnsw.connectivity, expansion_add=hnsw.expansion_add)
    start = time.perf_counter()
    fill(index, np.arange(len(base), dtype=np.uint64), base)
    build_s = time.perf_counter() - start

    def search(query: np.ndarray, ef: int) -> np.ndarray:
        index.expansion_search = ef  # type: ignore[misc]  # usearch has a setter; its stub misses it
        found = np.full(K, -1, dtype=np.int64)
        keys = np.asarray(index.search(query, K, threads=1).keys, dtype=np.int64)
        found[: len(keys)] = keys
        return found

    return _Built({"dtype": dtype, "metric": metric, "build_s": build_s, "memory_mb": index.memory_usage / 2**20}, search)


def _faiss(base: np.ndarray) -> _Built:
    """faiss IndexHNSWFlat (f32, inner product) with the same graph settings, built on every core, searched on one."""
    import faiss

    hnsw = HnswConfig()
    index = faiss.IndexHNSWFlat(DIM, hnsw.connectivity, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = hnsw.expansion_add
    start = time.perf_counter()
    index.add(base)
    build_s = time.perf_counter() - start
    memory_mb = faiss.serialize_index(index).nbytes / 2**20  # the vectors and the graph, as held in memory
    faiss.omp_set_num_threads(1)  # for the rest of this process: every search of this bench is one query on one thread

    def search(query: np.ndarray, ef: int) -> np.ndarray:
        index.hnsw.efSearch = ef
        return np.asarray(index.search(query[None], K)[1][0], dtype=np.int64)

    return _Built({"build_s": build_s, "memory_mb": memory_mb}, search)


def _milvus(base: np.ndarray, queries: np.ndarray, truth: np.ndarray, repeats: int, *, folder: Path) -> dict[str, Any]:
    """compir's MilvusStore on a Milvus Lite file: HNSW (ef sweep) and FLAT, same vectors as ``truth``."""
    from compir.manifest import EncoderFingerprint, PreprocessSpec
    from compir.runtime.milvus_store import MilvusConfig, MilvusStore

    preprocess = PreprocessSpec(image_size=32, resize_mode="shortest", interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    encoder = EncoderFingerprint(image_encoder_sha256="0" * 64, preprocess=preprocess, embed_dim=DIM, metric="cos")
    ids = [str(i) for i in range(len(base))]
    features = np.zeros((len(base), 1), np.float32)  # one float: the bench measures the vector search, not feature storage
    results: dict[str, Any] = {"vectors": len(base)}
    folder.mkdir(parents=True, exist_ok=True)
    hnsw = HnswConfig()
    for kind, config in [("hnsw", MilvusConfig.from_hnsw(str(folder / "bench.db"), collection="bench_hnsw", hnsw=hnsw)),
                         ("flat", MilvusConfig(str(folder / "bench.db"), collection="bench_flat", index_type="FLAT",
                                               index_params={}, search_params={}))]:
        store = MilvusStore.create(config, ndim=DIM, feature_shape=(1,), encoder=encoder, overwrite=True)
        start = time.perf_counter()
        store.add(ids, embeds=base, features=features, paths=[""] * len(base))
        store.commit(folder)
        if kind == "hnsw":
            _wait_for_graph(store, queries, truth)
        build_s = time.perf_counter() - start
        sweep = []
        for ef in SWEEP if kind == "hnsw" else (0,):
            if kind == "hnsw":
                store.config = MilvusConfig.from_hnsw(config.uri, collection=config.collection,
                                                      hnsw=HnswConfig(hnsw.connectivity, hnsw.expansion_add, ef))
            hits, seconds = _timed(functools.partial(store.search, queries, k=K), repeats)
            found = np.asarray([[int(item) for item, _ in row] + [-1] * (K - len(row)) for row in hits], dtype=np.int64)
            sweep.append({"setting": ef, "recall": recall_at_k(found, truth), "qps": len(queries) / seconds})
        results[kind] = {"build_s": build_s, "sweep": sweep}
    return results


def _wait_for_graph(store: Any, queries: np.ndarray, truth: np.ndarray, *, limit_s: float = 900.0) -> None:
    """Milvus Lite builds HNSW graphs in a background thread after a flush and searches rows not
    indexed yet exactly, and no API tells when it is done. At ef 16 a graph misses some true
    neighbours, brute force none: wait until recall at ef 16 is below 0.999 and three searches
    5 s apart agree on speed (within 15 %)."""
    config = store.config
    store.config = type(config)(config.uri, config.collection, config.index_type, config.index_params, {"ef": 16})
    seconds: list[float] = []
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        hits = store.search(queries, k=K)
        seconds.append(time.perf_counter() - start)
        found = np.asarray([[int(item) for item, _ in row] + [-1] * (K - len(row)) for row in hits], dtype=np.int64)
        last = seconds[-3:]
        if recall_at_k(found, truth) < 0.999 and len(last) == 3 and max(last) <= 1.15 * min(last):
            break
        time.sleep(5)
    store.config = config


def _milvus_rows(milvus: dict[str, Any], usearch: dict[str, Any], exact_qps: float) -> tuple[list[list[Any]], dict[str, Any]]:
    """Table rows and figures: Milvus HNSW at each recall level against usearch and exact (same vectors), and FLAT."""
    rows, figures = [], {}
    for level in RECALL_LEVELS:
        ours, theirs = at_recall(milvus["hnsw"]["sweep"], level), at_recall(usearch["sweep"], level)
        figures[f"recall>={level}"] = {"milvus_hnsw": ours, "usearch": theirs}
        rows.append([f"HNSW, recall >= {level}",
                     f"{ours['qps']:,.0f} q/s (ef {ours['setting']}, R {ours['recall']:.3f})" if ours else "not reached",
                     f"{ours['qps'] / exact_qps:.1f}x" if ours else "-",
                     f"{theirs['qps']:,.0f} q/s (ef {theirs['setting']})" if theirs else "not reached",
                     f"{ours['qps'] / theirs['qps']:.3f}x" if ours and theirs else "-"])
    flat = milvus["flat"]["sweep"][0]
    rows.append(["FLAT (brute force)", f"{flat['qps']:,.0f} q/s (R {flat['recall']:.3f})", f"{flat['qps'] / exact_qps:.1f}x", "-", "-"])
    return rows, figures


def _faiss_skipped() -> dict[str, Any]:
    """The shape of :func:`_faiss`'s figures with nothing measured (the tables say "skipped")."""
    sweep = [{"setting": ef, "recall": float("nan"), "qps": float("nan")} for ef in SWEEP]
    return {"build_s": float("nan"), "memory_mb": float("nan"), "sweep": sweep, "skipped": True}


def at_recall(sweep: list[dict[str, Any]], level: float) -> dict[str, Any] | None:
    """The fastest sweep point whose recall reaches ``level`` (None if none does)."""
    reaching = [point for point in sweep if point["recall"] >= level]
    return max(reaching, key=lambda point: point["qps"]) if reaching else None


def _has_milvus() -> bool:
    try:
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError:
        return False
    return True


def _graphs(quick: bool, chosen: str) -> list[tuple[str, str, str]]:
    """(label, dtype, metric) of the usearch graphs to measure: compir's graph before this change (f16 under the
    cosine), then every storage type under compir's metric (--quick), or only the one ``--dtype auto`` chose (full)."""
    from compir.runtime.ann_dtype import AUTO_CANDIDATES, metric_for

    wanted = os.environ.get(DTYPES_VARIABLE, ",".join(AUTO_CANDIDATES) if quick else chosen).split(",")
    return [("usearch f16, cos (compir before)", "f16", "cos"),
            *[(f"usearch {dtype}, {metric_for(dtype)}" + (" (auto's choice)" if dtype == chosen else ""), dtype, metric_for(dtype))
              for dtype in wanted]]


def _speed_rows(graphs: dict[str, dict[str, Any]], faiss: dict[str, Any], exact_qps: float) -> tuple[list[list[Any]], dict[str, Any]]:
    """Per index and recall level: the fastest sweep point reaching it, against exact and faiss at the same level."""
    rows: list[list[Any]] = []
    comparison: dict[str, dict[str, Any]] = {}
    for level in RECALL_LEVELS:
        theirs = at_recall(faiss["sweep"], level)
        rows.append([FAISS_LABEL, f">= {level}",
                     f"{theirs['qps']:,.0f} (ef {theirs['setting']}, R {theirs['recall']:.3f})" if theirs
                     else ("skipped" if faiss.get("skipped") else "not reached"),
                     f"{theirs['qps'] / exact_qps:.1f}x" if theirs else "-", "1.00x" if theirs else "-", f"{faiss['memory_mb']:,.0f}"])
        for label, graph in graphs.items():
            ours = at_recall(graph["sweep"], level)
            ratio = ours["qps"] / theirs["qps"] if ours and theirs else None
            comparison.setdefault(label, {})[f"recall>={level}"] = {"usearch": ours, "faiss": theirs, "usearch_vs_faiss": ratio,
                                                                    "usearch_speedup_vs_exact": ours["qps"] / exact_qps if ours else None}
            speed = f"{ours['qps']:,.0f} (ef {ours['setting']}, R {ours['recall']:.3f})" if ours else "not reached"
            rows.append([label, f">= {level}", speed, f"{ours['qps'] / exact_qps:.1f}x" if ours else "-",
                         f"{ratio:.2f}x" if ratio else "-", f"{graph['memory_mb']:,.0f}"])
    return rows, comparison


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    from compir.runtime.ann_dtype import choose_dtype

    count, n_queries, repeats = (100_000, 500, 3) if quick else (1_000_000, 1_000, 3)
    count = int(os.environ.get(SIZE_VARIABLE, count))
    rng = np.random.default_rng(0)
    # ~500 vectors per cluster at every size (2,000 clusters at 1M), so --quick keeps the structure.
    centres = rng.normal(size=(max(40, count // 500), DIM)).astype(np.float32) / np.sqrt(DIM)
    base = clustered_vectors(count, seed=1, centres=centres)
    queries = clustered_vectors(n_queries, seed=2, centres=centres)
    truth, exact_s = _timed(lambda: exact_top_k(base, queries), 1 if not quick else repeats)
    exact_qps = n_queries / exact_s
    hnsw = HnswConfig()
    start = time.perf_counter()
    choice = choose_dtype(base, connectivity=hnsw.connectivity, expansion_add=hnsw.expansion_add, expansion_search=hnsw.expansion_search)
    choice_s = time.perf_counter() - start
    built = {label: _usearch(base, dtype=dtype, metric=metric) for label, dtype, metric in _graphs(quick, choice.dtype)}
    if os.environ.get(FAISS_VARIABLE, "1") != "0":
        built[FAISS_LABEL] = _faiss(base)
    _sweep(built, queries, truth, repeats)
    faiss = built.pop(FAISS_LABEL).figures if FAISS_LABEL in built else _faiss_skipped()
    graphs = {label: entry.figures for label, entry in built.items()}
    usearch = next(graph for label, graph in graphs.items() if label.endswith("(auto's choice)")) \
        if any(label.endswith("(auto's choice)") for label in graphs) else next(iter(graphs.values()))
    rows, comparison = _speed_rows(graphs, faiss, exact_qps)
    milvus_count = min(count, int(os.environ.get(MILVUS_VARIABLE, MILVUS_QUICK if quick else MILVUS_MAX)))
    milvus_table = ""
    if milvus_count > 0 and _has_milvus():
        sub, sub_truth, sub_exact_qps, sub_usearch = base, truth, exact_qps, usearch
        if milvus_count < count:  # exact and usearch again, on the same vectors as Milvus
            sub = base[:milvus_count]
            sub_truth, sub_exact_s = _timed(lambda: exact_top_k(sub, queries), repeats)
            sub_exact_qps = n_queries / sub_exact_s
            again = {"usearch": _usearch(sub, dtype=usearch["dtype"], metric=usearch["metric"])}
            _sweep(again, queries, sub_truth, repeats)
            sub_usearch = again["usearch"].figures
        milvus = _milvus(sub, queries, sub_truth, repeats, folder=out_dir / "milvus-lite")
        milvus_rows, milvus_figures = _milvus_rows(milvus, sub_usearch, sub_exact_qps)
        figures_milvus = {"lite": milvus, "exact_qps": sub_exact_qps, "usearch": sub_usearch, "at_equal_recall": milvus_figures}
        milvus_table = "\n\n".join([
            f"Milvus Lite (embedded, over gRPC), {milvus_count:,} of these vectors: build+index HNSW {milvus['hnsw']['build_s']:.1f} s, "
            f"FLAT {milvus['flat']['build_s']:.1f} s; exact numpy on them {sub_exact_qps:,.1f} q/s.",
            markdown_table(["Milvus Lite (all queries in one call)", "queries/s", "vs exact", f"usearch {usearch['dtype']} (one per call)",
                            "Milvus / usearch"], milvus_rows),
            markdown_table(["ef", "Milvus HNSW recall", "Milvus q/s"],
                           [[p["setting"], f"{p['recall']:.4f}", f"{p['qps']:,.0f}"] for p in milvus["hnsw"]["sweep"]]),
        ])
    else:
        figures_milvus = {"skipped": True}
    before = comparison[next(iter(graphs))]["recall>=0.98"]
    ours = max((levels["recall>=0.98"] for label, levels in comparison.items() if label.endswith("(auto's choice)")),
               key=lambda point: point["usearch_vs_faiss"] or 0.0, default=before)
    figures = {
        "vectors": count, "dim": DIM, "queries": n_queries, "k": K, "one_query_per_call": True, "search_threads": 1,
        "exact": {"qps": exact_qps, "seconds": exact_s},
        "dtype_auto": {**choice.record(), "seconds": choice_s},
        "usearch": graphs, "faiss_hnsw_flat": faiss, "at_equal_recall": comparison, "milvus": figures_milvus,
        "goal_recall_0.98_at_20x_exact": bool(ours["usearch_speedup_vs_exact"] is not None and ours["usearch_speedup_vs_exact"] >= 20.0),
        "goal_recall_0.98_at_1x_faiss": bool(ours["usearch_vs_faiss"] is not None and ours["usearch_vs_faiss"] >= 1.0),
    }
    sweep_rows = [[p["setting"], *[f"{g['sweep'][i]['recall']:.4f} / {g['sweep'][i]['qps']:,.0f}" for g in graphs.values()],
                   f"{faiss['sweep'][i]['recall']:.4f} / {faiss['sweep'][i]['qps']:,.0f}"] for i, p in enumerate(faiss["sweep"])]
    auto_rows = [[dtype, f"{point['recall']:.4f}", f"{point['us_per_query']:,.0f}", "chosen" if dtype == choice.dtype else ""]
                 for dtype, point in choice.measured.items()]
    table = "\n\n".join([
        f"{count:,} x {DIM} clustered vectors, {n_queries} queries, top-{K}, one query per call, 1 search thread. "
        f"Exact numpy (batched, all cores): {exact_qps:,.1f} q/s. Builds (all cores): "
        + ", ".join(f"{label} {g['build_s']:.1f} s" for label, g in graphs.items()) + f", faiss HNSWFlat {faiss['build_s']:.1f} s.",
        markdown_table(["index", "recall@10", "queries/s (ef, recall)", "vs exact", "vs faiss", "memory MB"], rows),
        f"--dtype auto on this gallery ({choice.sample:,}-vector sample, {choice_s:.1f} s): chose {choice.dtype}.",
        markdown_table(["dtype", "sample recall@10", "us/query", ""], auto_rows),
        markdown_table(["ef", *[f"{label}: recall / q/s" for label in graphs], "faiss: recall / q/s"], sweep_rows),
        *([milvus_table] if milvus_table else []),
    ])
    plot = bar_chart(out_dir / "index.png", panels=[
        Panel("queries/s by search breadth (ef), one query per call", {
            **{label: {str(p["setting"]): p["qps"] for p in g["sweep"]} for label, g in graphs.items()},
            "faiss HNSWFlat": {str(p["setting"]): p["qps"] for p in faiss["sweep"]}}, "queries/s", log_scale=True),
        Panel("recall@10 by search breadth (ef)", {
            **{label: {str(p["setting"]): p["recall"] for p in g["sweep"]} for label, g in graphs.items()},
            "faiss HNSWFlat": {str(p["setting"]): p["recall"] for p in faiss["sweep"]}}, "recall@10",
            reference_line=0.98, reference_label="goal 0.98"),
    ])
    return BenchResult(name=NAME, figures=figures, table=table, plots=(plot,))
