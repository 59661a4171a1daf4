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
