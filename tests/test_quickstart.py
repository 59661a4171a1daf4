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


def test_zero_shot_quickstart_trains_without_triplets_and_answers_through_the_runtime(tmp_path, capsys):
    from compir.manifest import load_manifest
    from compir.quickstart_zero_shot import ZERO_SHOT_STEPS

    out = tmp_path / "zs"
    code = main(["--zero-shot", "--out", str(out), "--model", "micro", "--steps", "4", "--n-val", "40", "--n-test", "80",
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "quickstart.json").read_text())
    assert list(summary["seconds"]) == [step.name for step in ZERO_SHOT_STEPS]
    clip_log = json.loads((out / "clip" / "train_log.json").read_text())
    mapping_log = json.loads((out / "run" / "train_log.json").read_text())
    assert clip_log["objective"] == "clip" and mapping_log["head"] == "pic2word"
    assert summary["clip"]["steps"] == 4 and summary["train"]["steps"] >= 1
    # zero-shot beside the three training-free baselines, on the test split
    assert set(summary["eval"]) >= {"composed", "image_only", "text_only", "sum"}
    assert "| image + text |" in printed and "| text only |" in printed
    manifest = load_manifest(out / "export")
    assert manifest.zero_shot and "{modification}" in manifest.composition_spec.prompt_template
    query = summary["query"]
    assert len(query["hits"]) == 5 and "token_map" in query["timings_ms"] and "compose" not in query["timings_ms"]
