"""``compir eval`` on a checkpoint (with baselines) and on an export folder (through the runtime)."""

from __future__ import annotations

import json

import pytest

from compir.errors import ContractError, InputError
from compir.evaluate import evaluate_path, main


@pytest.fixture(scope="module")
def checkpoint_result(tiny_checkpoint, synth_data):
    return evaluate_path(tiny_checkpoint, data=synth_data, split="val", progress=False)


def test_checkpoint_report_has_protocol_breakdown_and_baselines(checkpoint_result):
    assert list(checkpoint_result.reports) == ["composed", "image_only", "text_only"]
    composed = checkpoint_result.reports["composed"]
    assert composed.protocol == "synthetic" and {"seen", "unseen"} <= set(composed.breakdown)
    assert any(group.startswith("kind=") for group in composed.breakdown)
    # Same queries and gallery for all three; the trained composition beats both baselines.
    assert {r.n_queries for r in checkpoint_result.reports.values()} == {composed.n_queries}
    for baseline in ("image_only", "text_only"):
        assert composed.metrics["R@1"] > checkpoint_result.reports[baseline].metrics["R@1"]


def test_cli_prints_tables_and_writes_json(tiny_checkpoint, synth_data, tmp_path, capsys, checkpoint_result):
    out_json = tmp_path / "eval.json"
    assert main([str(tiny_checkpoint), "--data", str(synth_data), "--split", "val", "--json", str(out_json), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for label in ("| composed |", "| image only |", "| text only |", "| unseen |"):
        assert label in printed
    saved = json.loads(out_json.read_text())
    assert saved["reports"]["composed"]["metrics"] == pytest.approx(checkpoint_result.reports["composed"].metrics)


def test_export_folder_matches_its_checkpoint(tiny_export, synth_data, checkpoint_result):
    exported = evaluate_path(tiny_export, data=synth_data, split="val", variant="fp32", progress=False)
    assert exported.source_kind == "export" and list(exported.reports) == ["composed"]
    torch_metrics = checkpoint_result.reports["composed"].metrics
    for name, value in exported.reports["composed"].metrics.items():
        # fp32 ONNX vs torch: the same ranking up to a rare near-tie
        assert value == pytest.approx(torch_metrics[name], abs=2.0), name


def test_bad_sources_are_contract_errors(tmp_path, synth_data):
    with pytest.raises(ContractError, match="does not exist"):
        evaluate_path(tmp_path / "missing.pt", data=synth_data, split="val")
    with pytest.raises(ContractError, match="manifest.json"):
        evaluate_path(tmp_path, data=synth_data, split="val")


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_submission_for_an_unlabelled_cirr_split(source, tiny_checkpoint, tiny_export, tmp_path, capsys):
    from tests.fixtures.data import write_cirr

    names = [f"test1-{i}-0-img{j}" for i in range(3) for j in range(2)]
    records = [
        {"pairid": 11 + i, "reference": names[2 * i], "caption": text,
         "img_set": {"id": i, "members": names[:4], "reference_rank": 0}}
        for i, text in enumerate(["make it red", "add a square", "remove the circle"])
    ]
    write_cirr(tmp_path / "cirr", split="test1", records=records, names=names)
    path = tiny_checkpoint if source == "checkpoint" else tiny_export
    # Scoring an unlabelled split is refused with a pointer to --submission.
    with pytest.raises(InputError, match="--submission"):
        main([str(path), "--data", str(tmp_path / "cirr"), "--split", "test1", "--no-progress"])
    code = main([str(path), "--data", str(tmp_path / "cirr"), "--split", "test1", "--submission", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    recall = json.loads((tmp_path / "out" / "recall_submission_compir.json").read_text())
    subset = json.loads((tmp_path / "out" / "recall_subset_submission_compir.json").read_text())
    assert recall["version"] == subset["version"] == "rc2" and recall["metric"] == "recall"
    for record in records:
        ranked = recall[str(record["pairid"])]
        assert record["reference"] not in ranked and set(ranked) <= set(names)
        assert len(subset[str(record["pairid"])]) == 3 and record["reference"] not in subset[str(record["pairid"])]
    assert "wrote" in capsys.readouterr().out


def test_fashioniq_val_queries_gallery_through_the_cli(tiny_checkpoint, tmp_path, capsys):
    from tests.fixtures.data import write_fashioniq

    records = [{"candidate": "D0", "target": "D1", "captions": ["is red", "has long sleeves"]},
               {"candidate": "D2", "target": "D3", "captions": ["is blue", "is shorter"]}]
    write_fashioniq(tmp_path / "fiq", category="dress", split="val", records=records, names=[f"D{i}" for i in range(6)])
    out_json = tmp_path / "fiq.json"
    assert main([str(tiny_checkpoint), "--data", str(tmp_path / "fiq"), "--split", "val", "--gallery", "val-queries",
                 "--no-baselines", "--no-progress", "--json", str(out_json)]) == 0
    assert "fashioniq-val-queries protocol, 2 queries" in capsys.readouterr().out
    composed = json.loads(out_json.read_text())["reports"]["composed"]
    # 4 val-query images, each query's reference removed: 3 candidates, so R@10 is 100 whatever the model
    assert composed["protocol"] == "fashioniq-val-queries" and composed["metrics"]["R@10"] == 100.0


def test_val_queries_gallery_is_fashioniq_only(tiny_checkpoint, synth_data):
    with pytest.raises(InputError, match="val-queries gallery is TG-CIR's FashionIQ protocol"):
        evaluate_path(tiny_checkpoint, data=synth_data, split="val", gallery="val-queries", progress=False)
