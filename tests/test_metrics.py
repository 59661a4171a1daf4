"""Metrics against hand-computed rankings: reference removal, pessimistic ties, subsets, protocols."""

from __future__ import annotations

import numpy as np
import pytest

from compir.data.types import CirSplit, Query
from compir.errors import DatasetError, InputError
from compir.metrics import evaluate_split, target_ranks, top_k

GALLERY = ["a", "b", "c", "d", "e"]


def one_hot_gallery(n: int) -> np.ndarray:
    # gallery item i is the unit vector e_i, so a query's score on item i is its i-th component
    return np.eye(n, dtype=np.float32)


def queries_scoring(rows: list[list[float]]) -> np.ndarray:
    scores = np.array(rows, dtype=np.float32)
    return scores / np.linalg.norm(scores, axis=1, keepdims=True)


def split_of(queries: list[Query], *, protocol: str = "cirr", gallery: list[str] = GALLERY) -> CirSplit:
    from pathlib import Path

    return CirSplit(name="val", protocol=protocol, root=Path("."), queries=tuple(queries), gallery=tuple(gallery))


def evaluate(split: CirSplit, rows: list[list[float]], names: list[str] = GALLERY):
    return evaluate_split(split, query_embeds=queries_scoring(rows), gallery_embeds=one_hot_gallery(len(names)), gallery_names=names)


def test_cirr_removes_the_reference_from_its_own_ranking():
    # scores a=.9 b=.5 c=.7 d=.1 e=.3; reference a is removed, so target c ranks 1st
    split = split_of([Query("0", "a", "t", targets=("c",))])
    report = evaluate(split, [[0.9, 0.5, 0.7, 0.1, 0.3]])
    assert report.metrics["R@1"] == 100.0
    # Shoes keeps the reference: c is 2nd
    shoes = evaluate(split_of([Query("0", "a", "t", targets=("c",))], protocol="shoes"), [[0.9, 0.5, 0.7, 0.1, 0.3]])
    assert shoes.metrics == {"R@1": 0.0, "R@10": 100.0, "R@50": 100.0}


def test_ties_with_the_target_count_against_it_whatever_the_gallery_order():
    rows = [[0.2, 0.6, 0.6, 0.1, 0.05]]  # b ties target c
    for names in (GALLERY, ["a", "c", "b", "d", "e"]):
        row = [rows[0][GALLERY.index(n)] for n in names]
        report = evaluate(split_of([Query("0", "a", "t", targets=("c",))], gallery=names), [row], names)
        assert report.metrics["R@1"] == 0.0 and report.metrics["R@5"] == 100.0
    # a single constant embedding for everything scores 0 at R@1, not 100
    flat = evaluate(split_of([Query("0", "a", "t", targets=("c",))]), [[1, 1, 1, 1, 1]])
    assert flat.metrics["R@1"] == 0.0


def test_recall_at_k_over_several_queries():
    queries = [
        Query("0", "a", "t", targets=("c",)),  # rank 1 (a removed)
        Query("1", "b", "t", targets=("e",)),  # e below a, c, d: rank 4
        Query("2", "e", "t", targets=("a",)),  # rank 2
    ]
    rows = [[0.9, 0.5, 0.7, 0.1, 0.3], [0.8, 0.9, 0.7, 0.6, 0.1], [0.5, 0.2, 0.6, 0.1, 0.9]]
    report = evaluate(split_of(queries), rows)
    assert report.metrics["R@1"] == pytest.approx(100 / 3)
    assert report.metrics["R@5"] == 100.0 and report.n_queries == 3


def test_recall_subset_ranks_only_the_members_minus_the_reference():
    # members a (reference), b, c, d; e scores highest but is no member; d beats target c
    query = Query("0", "a", "t", targets=("c",), subset=("a", "b", "c", "d"))
    report = evaluate(split_of([query]), [[0.9, 0.1, 0.5, 0.6, 0.95]])
    assert report.metrics["Rs@1"] == 0.0 and report.metrics["Rs@2"] == 100.0
    # over the whole gallery minus a: e .95 > d .6 > c .5, so c is 3rd
    assert report.metrics["R@1"] == 0.0 and report.metrics["R@5"] == 100.0
    assert report.metrics["Avg"] == pytest.approx((report.metrics["R@5"] + report.metrics["Rs@1"]) / 2)


def test_synthetic_breaks_down_by_seen_unseen_and_kind():
    queries = [
        Query("0", "a", "t", targets=("c",), subset=("a", "b", "c"), kind="add", unseen=False),  # hit
        Query("1", "a", "t", targets=("b",), subset=("a", "b", "c"), kind="add", unseen=True),  # miss at 1
        Query("2", "d", "t", targets=("e",), subset=("d", "e", "c"), kind="move", unseen=False),  # hit
    ]
    rows = [[0.9, 0.5, 0.7, 0.1, 0.3], [0.9, 0.5, 0.7, 0.1, 0.3], [0.1, 0.1, 0.1, 0.9, 0.5]]
    report = evaluate(split_of(queries, protocol="synthetic"), rows)
    assert report.breakdown["seen"]["R@1"] == 100.0
    assert report.breakdown["unseen"]["R@1"] == 0.0
    assert report.breakdown["kind=add"]["R@1"] == 50.0 and report.breakdown["kind=move"]["R@1"] == 100.0
    assert report.group_sizes == {"seen": 2, "unseen": 1, "kind=add": 2, "kind=move": 1}
    table = report.format_table()
    assert "| unseen | 1 |" in table and "Rs@1" in table
    assert report.to_dict()["breakdown"]["kind=add"]["R@1"] == 50.0


def test_fashioniq_ranks_each_category_against_its_own_gallery_and_keeps_the_reference():
    # dress: reference x scores highest and is kept, 9 others beat target y -> rank 11, a miss at
    # R@10 (it would be rank 10 were x removed); the shirts score higher still but are not candidates
    dress = ["dress/x", "dress/y"] + [f"dress/o{i}" for i in range(9)]
    names = dress + ["shirt/z", "shirt/v"]
    queries = [
        Query("dress.0", "dress/x", "t", targets=("dress/y",), group="dress"),
        Query("shirt.0", "shirt/z", "t", targets=("shirt/v",), group="shirt"),
    ]
    rows = [[0.9, 0.1] + [0.5] * 9 + [1.0, 1.0], [0.0] * 11 + [0.2, 0.1]]
    report = evaluate(split_of(queries, protocol="fashioniq", gallery=names), rows, names)
    assert report.breakdown["dress"] == {"R@10": 0.0, "R@50": 100.0}
    # shirt: only z (the kept reference) is ahead of v; dress items (score 0) do not matter
    assert report.breakdown["shirt"] == {"R@10": 100.0, "R@50": 100.0}
    assert report.metrics == {"R@10": 50.0, "R@50": 100.0, "Avg": 75.0}


def test_fashioniq_averages_categories_not_queries():
    names = ["dress/x", "dress/y"] + [f"shirt/{i}" for i in range(12)]
    queries = [Query("d", "dress/x", "t", targets=("dress/y",), group="dress")]
    # the shirt target scores below 11 shirts: rank 12 > 10, a miss at R@10
    shirt_row = [0.0, 0.0] + [0.5] * 11 + [0.1]
    queries.append(Query("s", "shirt/0", "t", targets=("shirt/11",), group="shirt"))
    report = evaluate(split_of(queries, protocol="fashioniq", gallery=names), [[0.1, 0.9] + [0.0] * 12, shirt_row], names)
    assert report.breakdown["shirt"]["R@10"] == 0.0 and report.breakdown["dress"]["R@10"] == 100.0
    assert report.metrics["R@10"] == 50.0 and report.metrics["R@50"] == 100.0


def test_top_k_breaks_ties_by_gallery_order():
    assert top_k(np.array([0.1, 0.5, 0.5, 0.9, 0.5]), 4).tolist() == [3, 1, 2, 4]


def test_bad_inputs_are_refused_with_a_clear_error():
    split = split_of([Query("0", "a", "t", targets=("c",))])
    with pytest.raises(InputError, match="query embeddings"):
        evaluate_split(split, query_embeds=np.zeros((2, 5)), gallery_embeds=np.eye(5), gallery_names=GALLERY)
    with pytest.raises(InputError, match="not in gallery_names"):
        evaluate(split, [[1, 0, 0, 0]], ["a", "b", "d", "e"])
    with pytest.raises(InputError, match="duplicates"):
        evaluate(split, [[1, 0, 0, 0, 0]], ["a", "b", "c", "c", "e"])
    with pytest.raises(InputError, match="NaN"):
        evaluate_split(split, query_embeds=np.full((1, 5), np.nan), gallery_embeds=np.eye(5), gallery_names=GALLERY)
    hidden = split_of([Query("0", "a", "t")])
    with pytest.raises(DatasetError, match="submission"):
        evaluate(hidden, [[1, 0, 0, 0, 0]])


def brute_force_rank(scores: list[float], target: int, reference: int | None) -> int:
    # sort candidates by score descending, the target after every item it ties with
    candidates = [i for i in range(len(scores)) if i != reference or i == target]
    order = sorted(candidates, key=lambda i: (-scores[i], i == target))
    return order.index(target) + 1


def test_ranks_match_a_brute_force_sort_with_ties_against_the_target():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=80, deadline=None)
    @given(
        st.lists(st.integers(min_value=0, max_value=3), min_size=3, max_size=9),
        st.data(),
    )
    def check(levels, data):
        n = len(levels)
        target = data.draw(st.integers(0, n - 1))
        reference = data.draw(st.integers(0, n - 1).filter(lambda r: r != target))
        names = [f"g{i}" for i in range(n)]
        # scores 0.1 .. 0.4 against a one-hot gallery: many exact ties by construction
        row = [0.1 + 0.1 * level for level in levels]
        query = [Query("0", names[reference], "t", targets=(names[target],))]
        index = {name: i for i, name in enumerate(names)}
        for remove, ref in ((True, reference), (False, None)):
            ranks = target_ranks(query, queries_scoring([row]), one_hot_gallery(n), index, remove_reference=remove)
            assert ranks.tolist() == [brute_force_rank(row, target, ref)]
        # and through the public entry point
        report = evaluate(split_of(query, gallery=names), [row], names)
        assert report.metrics["R@1"] == (100.0 if brute_force_rank(row, target, reference) == 1 else 0.0)

    check()
