"""Scale-out: ``torchrun`` with 2 CPU processes (gloo) trains a few DDP steps and saves once."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from compir.train.checkpoint import load_checkpoint


def test_torchrun_two_processes_gloo(synth_data, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "compir", "train", "--data", str(synth_data), "--model", "micro", "--out", str(out),
        "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "8", "--val-queries", "16",
        "--device", "cpu", "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "on cpu x2" in result.stdout  # both processes joined one group
    assert result.stdout.count("best checkpoint:") == 1  # only rank 0 validates and saves
    loaded = load_checkpoint(out / "last.pt")
    assert loaded.step == 3 and loaded.epoch == 1
    raw = torch.load(out / "last.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in raw["state_dict"])
