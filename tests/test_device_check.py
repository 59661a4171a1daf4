"""scripts/device-check.sh: its plan (--dry-run) and its CPU rehearsal (the checks a CPU can run:
training with a falling loss, export with CPU parity, the onnxruntime parity and latency code on the
CPU provider; TensorRT skipped with its one line), through the shell script itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device-check.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)


def test_dry_run_lists_every_check_and_runs_nothing(tmp_path: Path) -> None:
    done = _run("--dry-run", "--work", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" ")[0] for line in lines[:-1]] == ["PLAN"] * len(lines[:-1])
    assert "PLAN train:ViT-B-32: compir train --model ViT-B-32 --steps 50 --amp auto --device cuda" in lines
    assert any(line.startswith("PLAN torchrun:") and "(nccl)" in line for line in lines)
    assert any(line.startswith("PLAN tensorrt: compir export engine") for line in lines)
    assert any(line.startswith("PLAN ort-cuda:latency:") for line in lines) and lines[-1].startswith("summary: ")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and {c["status"] for c in summary["checks"]} == {"PLAN"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # nothing ran


@pytest.mark.slow  # ~50 s of CPU: four compir subprocesses (train, export) on the micro config
def test_cpu_rehearsal_runs_every_cpu_check(synth_data: Path, tmp_path: Path) -> None:
    done = _run("--device", "cpu", "--models", "micro", "--steps", "8", "--batch-size", "8", "--rounds", "2", "--data", str(synth_data),
                "--work", str(tmp_path), "--skip", "torchrun,ort-cuda:pytest")
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = {c["name"]: c for c in json.loads((tmp_path / "summary.json").read_text())["checks"]}
    assert {name: c["status"] for name, c in statuses.items()} == {
        "environment": "PASS", "data": "PASS", "train:micro": "PASS", "torchrun": "SKIP", "export": "PASS",
        "ort-cuda:pytest": "SKIP", "ort-cuda:parity": "PASS", "ort-cuda:latency": "PASS", "tensorrt": "SKIP",
    }
    train = statuses["train:micro"]["figures"]
    assert train["steps"] == 8 and train["last_loss"] == train["last_loss"] and train["steps_per_s"] > 0
    assert max(statuses["export"]["figures"]["parity"].values()) <= 1e-4
    assert set(statuses["ort-cuda:latency"]["figures"]) == {"1", "32"}
    assert "TensorRT is absent" in statuses["tensorrt"]["detail"]
    assert f"SKIP tensorrt: {statuses['tensorrt']['detail']}" in done.stdout.splitlines()
