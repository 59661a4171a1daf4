"""``compir quickstart`` end to end with a tiny budget (the real run is the goal benchmark)."""

from __future__ import annotations

import json

from compir.quickstart import STEPS, main


def test_quickstart_runs_every_step_and_says_where_things_went(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["--out", str(out), "--model", "micro", "--minutes", "0.1", "--n-val", "40", "--n-test", "80", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "quickstart.json").read_text())
    assert list(summary["seconds"]) == [step.name for step in STEPS]
    assert (out / "data" / "dataset.json").is_file() and (out / "run" / "best.pt").is_file()
    report = json.loads((out / "eval.json").read_text())
    assert report["split"] == "test" and set(report["reports"]) == {"composed", "image_only", "text_only"}
    assert report["reports"]["composed"]["n_queries"] == 80
    assert str(out / "run" / "best.pt") in printed and "| text only |" in printed
    # The runtime half: a verified export, an index of the test gallery, one composed query.
    assert summary["export"]["parity_max_abs_diff"] and max(summary["export"]["parity_max_abs_diff"].values()) <= 1e-4
    assert (out / "export" / "manifest.json").is_file() and (out / "index" / "index.json").is_file()
    assert summary["index"]["items"] == len(list((out / "gallery").iterdir())) > 0
    query = summary["query"]
    assert len(query["hits"]) == 5 and query["reference"] not in [hit["item_id"] for hit in query["hits"]]
    assert "compose" in query["timings_ms"] and "image_encode" not in query["timings_ms"]  # a gallery reference is cached
    assert f"compir search {out / 'export'} {out / 'index'}" in printed
