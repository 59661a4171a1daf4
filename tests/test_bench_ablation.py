"""The methods ablation's --quick path end to end (one seed, CI-sized data): every composer and
re-ranker trains, every row goes through the served path (export, usearch index, Retriever)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_ablation
from benchmarks.runner import main
from compir.errors import InputError

ROWS = ("combiner", "combiner-clip4cir", "tgcir-earlier", "tgcir-authors", "control", "mmref-finetuned", "+neucore", "+mmref", "+both")


@pytest.mark.slow  # five trainings and five exports: ~2.5 CPU-minutes
def test_quick_ablation_one_seed_through_the_served_path_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["ablation", "--quick", "--seeds", "3", "--out", str(out)]) == 0
    result = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    (seed,) = result["figures"]["seeds"]
    assert seed["seed"] == 3 and seed["best_tgcir"] in ("tgcir-earlier", "tgcir-authors")
    assert tuple(seed["rows"]) == ROWS
    for key, row in seed["rows"].items():
        assert all(0.0 <= value <= 100.0 for value in row["metrics"].values()), key
        assert row["metrics"]["R@1"] <= row["metrics"]["R@5"] <= row["metrics"]["R@10"]
        assert row["query_ms"] > 0.0  # reference image + text encoded, composed, searched
    for key in ("combiner", "tgcir-earlier", "tgcir-authors", "control", "mmref-finetuned"):
        assert seed["rows"][key]["rerank_share"] == 0.0
    neucore = seed["rows"]["+neucore"]
    # labelled by what ran: a method at weight 0 is not applied and costs no re-rank time
    assert ("not applied" in neucore["label"]) == (seed["neucore"]["weight"] == 0)
    assert (neucore["rerank_share"] > 0) == (seed["neucore"]["weight"] > 0)
    both = seed["rows"]["+both"]
    assert (both["rerank_share"] > 0) == (max(seed["joint"]["mmref_weight"], seed["joint"]["neucore_weight"]) > 0)
    assert len(seed["joint"]["grid"]) > 1  # the two weights were chosen together
    assert "seen R@1" in result["table"] and "CPU:" in result["notes"]
    assert (out / "ablation.png").stat().st_size > 0
    # a finished seed is read back, not run again
    seed_file = out / "ablation-work" / "quick" / "seed-3.json"
    before = seed_file.stat().st_mtime_ns
    again = bench_ablation.run(out_dir=out, quick=True, seeds="3", progress=False)
    assert seed_file.stat().st_mtime_ns == before and again.figures["seeds"][0]["rows"] == seed["rows"]


@pytest.mark.parametrize("seeds", ["", "a,b", "1,1"])
def test_bad_seeds_are_a_one_line_error(seeds: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--seeds"):
        bench_ablation.run(out_dir=tmp_path, quick=True, seeds=seeds)
