"""The usearch graph's metric and storage type: inner product on unit vectors, ``--dtype auto``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compir.runtime.ann_dtype import AUTO_CANDIDATES, choose_dtype
from compir.runtime.index import EXACT_MAX_ITEMS, HnswConfig, VectorIndex


def _clustered(count: int, *, seed: int, dim: int = 64, cells: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(cells, dim)).astype(np.float32)
    x = centres[rng.integers(0, cells, count)] + rng.normal(scale=0.3, size=(count, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_ann_path_finds_what_the_exact_path_finds_with_non_unit_queries() -> None:
    x = _clustered(EXACT_MAX_ITEMS + 3_000, seed=1)
    ann = VectorIndex(ndim=x.shape[1], search_mode="ann", hnsw=HnswConfig(expansion_search=128))
    exact = VectorIndex(ndim=x.shape[1], search_mode="exact")
    for index in (ann, exact):
        index.add(np.arange(len(x), dtype=np.uint64), x)
    queries = _clustered(50, seed=2) * 7.0  # inner product on the graph: queries are scaled to unit length first
    rows_ann, scores_ann = ann.search(queries, k=10)
    rows_exact, _ = exact.search(queries / 7.0, k=10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows_ann.tolist(), rows_exact.tolist(), strict=True)])
    assert recall >= 0.75  # this gallery is hard (cos on file order: 0.82 at this breadth)
    assert np.all(scores_ann <= 1.0 + 1e-2) and np.all(np.diff(scores_ann, axis=1) <= 1e-3)  # cosines, best first


def test_auto_dtype_measures_every_candidate_and_picks_a_fast_one_within_the_recall_slack() -> None:
    x = _clustered(6_000, seed=3)
    choice = choose_dtype(x, connectivity=16, expansion_add=64, expansion_search=64)
    assert set(choice.measured) == set(AUTO_CANDIDATES)
    best = max(point["recall"] for point in choice.measured.values())
    assert choice.measured[choice.dtype]["recall"] >= best - 0.005
    quicker = [d for d, p in choice.measured.items() if p["us_per_query"] < choice.measured[choice.dtype]["us_per_query"]]
    assert all(choice.measured[d]["recall"] < best - 0.005 for d in quicker)


@pytest.mark.parametrize("items", [200, EXACT_MAX_ITEMS + 500])
def test_index_json_records_what_auto_chose(tmp_path: Path, items: int) -> None:
    from compir.runtime.usearch_store import UsearchStore

    x = _clustered(items, seed=4)
    store = UsearchStore(ndim=x.shape[1], feature_shape=(1,), dtype="auto")
    store.add([f"i{n}" for n in range(items)], embeds=x, features=np.zeros((items, 1), np.float32), paths=[""] * items)
    record = store.commit(tmp_path)
    json.dumps(record)
    assert record["dtype"] in AUTO_CANDIDATES and record["dtype_choice"]["chosen"] == record["dtype"]
    if items <= EXACT_MAX_ITEMS:
        assert record["dtype"] == "f16" and "not_measured" in record["dtype_choice"]
    else:
        assert set(record["dtype_choice"]["measured"]) == set(AUTO_CANDIDATES)
