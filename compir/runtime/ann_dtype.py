"""The usearch graph's metric and storage type, chosen for speed at build time.

- Gallery vectors and queries are unit length, so the graph uses the inner product (i8 aside): the same
  ranking and scores as the cosine, without two norms per distance (1.1-1.3x the queries/s on
  100k x 512, f16, AVX2 EPYC).
- :func:`choose_dtype` picks the storage type (``--dtype auto``): it builds a small graph of each
  candidate on a sample of the gallery and times one-query searches at the configured breadth; the
  fastest whose recall@10 is within half a point of the best wins. The distance kernels differ per
  CPU class (bf16 and i8 are native on some, emulated on others) and i8's rounding costs recall on
  some galleries, so this is measured, not assumed.

Inserting the gallery grouped by k-means cell (so that a walk's vectors sit together in usearch's
buffer) gave 1.3-1.5x on the benchmark's vectors but lost up to 20 recall points on harder ones:
usearch lays vectors out in insertion order, and insertion order also shapes the graph. Not used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from usearch.index import Index



def metric_for(dtype: str) -> str:
    """Inner product on unit vectors (the cosine without two norms per distance), except for i8: usearch's i8
    inner product is the raw product of the rounded integers, and only its i8 cosine rescales them."""
    return "cos" if dtype == "i8" else "ip"

CHUNK = 65_536
AUTO_CANDIDATES = ("f32", "f16", "bf16", "i8")
AUTO_SAMPLE = 20_000
AUTO_QUERIES = 200
AUTO_RECALL_SLACK = 0.005
K = 10


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def fill(ann: Index, keys: np.ndarray, vectors: np.ndarray) -> None:
    """Insert every row as a unit vector, CHUNK rows at a time (a memory-mapped gallery is never copied whole)."""
    for start in range(0, len(keys), CHUNK):
        ann.add(np.ascontiguousarray(keys[start:start + CHUNK]), unit_rows(vectors[start:start + CHUNK]), threads=0)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    sample: int
    measured: dict[str, dict[str, float]]  # dtype -> {"recall": recall@10, "us_per_query": median}

    def record(self) -> dict[str, object]:
        return {"chosen": self.dtype, "sample": self.sample, "measured": self.measured}


def choose_dtype(vectors: np.ndarray, *, connectivity: int, expansion_add: int, expansion_search: int,
                 seed: int = 0) -> DtypeChoice:
    """Time each storage type on a sample of ``vectors`` (see the module docstring)."""
    from usearch.index import Index

    rng = np.random.default_rng(seed)
    count = len(vectors)
    picks = rng.permutation(count)[:AUTO_SAMPLE + AUTO_QUERIES]
    base_rows, query_rows = np.sort(picks[:-AUTO_QUERIES] if count > AUTO_QUERIES * 2 else picks), picks[-AUTO_QUERIES:]
    base, queries = unit_rows(vectors[base_rows]), unit_rows(vectors[query_rows])
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :K]
    keys = np.arange(len(base), dtype=np.uint64)
    measured: dict[str, dict[str, float]] = {}
    for dtype in AUTO_CANDIDATES:
        ann = Index(ndim=base.shape[1], metric=metric_for(dtype), dtype=dtype, connectivity=connectivity,
                    expansion_add=expansion_add, expansion_search=expansion_search)
        fill(ann, keys, base)
        found, seconds = _timed_one_by_one(ann, queries)
        recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))
        measured[dtype] = {"recall": round(recall, 4), "us_per_query": round(seconds * 1e6, 1)}
    best = max(point["recall"] for point in measured.values())
    good = [dtype for dtype in AUTO_CANDIDATES if measured[dtype]["recall"] >= best - AUTO_RECALL_SLACK]
    return DtypeChoice(min(good, key=lambda dtype: measured[dtype]["us_per_query"]), len(base), measured)


def _timed_one_by_one(ann: Index, queries: np.ndarray, repeats: int = 3) -> tuple[np.ndarray, float]:
    """(found keys (Q, K), median seconds per query over ``repeats`` passes after a warm-up pass)."""
    found = np.stack([np.asarray(ann.search(query, K, threads=1).keys, dtype=np.int64)[:K] for query in queries])
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for query in queries:
            ann.search(query, K, threads=1)
        runs.append((time.perf_counter() - start) / len(queries))
    return found, float(np.median(runs))
