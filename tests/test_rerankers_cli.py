"""``compir rerankers`` writes both sidecars beside (a copy of) the trained checkpoint."""

from __future__ import annotations

import shutil

import torch

from compir.cli import main


def test_rerankers_cli_writes_sidecars_bound_to_the_checkpoint(tiny_checkpoint, synth_data, tmp_path, capsys):
    checkpoint = tmp_path / "best.pt"
    shutil.copyfile(tiny_checkpoint, checkpoint)  # sidecars must not appear beside the shared fixture
    code = main(["rerankers", str(checkpoint), "--data", str(synth_data), "--steps", "4", "--val-queries", "24", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    for kind in ("neucore", "mmref"):
        sidecar = tmp_path / f"best.{kind}.pt"
        assert sidecar.is_file() and f"{kind}: {sidecar}" in printed
        record = torch.load(sidecar, map_location="cpu", weights_only=False)
        assert record["format"] == "compir.reranker"


def test_rerankers_cli_refuses_a_missing_checkpoint(synth_data, tmp_path, capsys):
    assert main(["rerankers", str(tmp_path / "nope.pt"), "--data", str(synth_data), "--only", "mmref"]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_the_export_says_which_rerankers_run_and_leaves_out_one_that_did_not_help(tiny_checkpoint, synth_data, tmp_path, capsys):
    from compir.train.neucore.train import train_neucore

    checkpoint = tmp_path / "best.pt"
    shutil.copyfile(tiny_checkpoint, checkpoint)
    train_neucore(checkpoint, data=synth_data, steps=1, batch_size=4, val_queries=8, weight=0.0, progress=False)
    assert main(["export", "onnx", str(checkpoint), "--out", str(tmp_path / "export"), "--calibration-count", "4"]) == 0
    printed = capsys.readouterr().out
    assert "re-ranker neucore: validation chose weight 0, so the runtime does not apply it; left out of the export" in printed
    assert not (tmp_path / "export" / "fp32" / "reranker.onnx").exists()
