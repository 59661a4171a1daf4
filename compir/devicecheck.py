"""The device check: what a GPU test machine can prove in one short run, and its CPU rehearsal.

``scripts/device-check.sh`` runs ``python -m compir.devicecheck``; each check is a ``compir``
command (or a short measurement), printed as one line ``PASS|FAIL|SKIP name: detail`` and gathered
in a JSON summary:

- ``train:<model>``: ``compir train`` for ``--steps`` steps with ``--amp auto`` on ``--device``; the
  loss of every step (``train_log.json``) finite and falling, steps/s and the precision chosen;
- ``train-cpu:<model>``: the same model's first ``--cpu-steps`` steps on the CPU, for the steps/s ratio;
- ``torchrun``: ``torchrun --nproc_per_node 1`` (NCCL on CUDA, gloo on the CPU) for a few steps;
- ``export``: ``compir export onnx`` of the first model's checkpoint, with fp32 parity checked on the CPU;
- ``ort-cuda:*`` (onnxruntime-gpu present): the gpu-marked tests, CUDA-provider parity against the
  CPU provider, and composed-query latency at batch 1 and 32 against torch eager on the same device;
- ``tensorrt``: skipped with one line while TensorRT is absent.

``--dry-run`` prints the plan. With ``--device cpu`` (small models, few steps) every check that
can run on a CPU runs, so the script is proven before GPU time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

EPILOG = """examples:
  scripts/device-check.sh --dry-run
  scripts/device-check.sh --device cpu --models micro --steps 4 --cpu-steps 2 --work /tmp/dc   (the CPU rehearsal)
  scripts/device-check.sh --device cuda --work /tmp/dc --summary device-check.json   (on the GPU machine: GPU only)
"""
CUDA_MODELS = "tiny-tgcir,ViT-B-32"  # the default model and a real backbone (random weights)


@dataclass
class CheckResult:
    name: str
    status: str  # PASS, FAIL, SKIP, PLAN (dry run)
    detail: str
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}" + (f" ({self.seconds:.0f} s)" if self.seconds >= 1 else "")


@dataclass(frozen=True)
class Check:
    name: str
    plan: str  # what it runs, for --dry-run
    run: Callable[[], CheckResult]
    needs: str = ""  # "ort-cuda" or "tensorrt": skipped with a line when absent


class DeviceCheck:
    """The checks for one ``--device``, in order, each a closure over the shared work folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work
        self.models = [m for m in (args.models or (CUDA_MODELS if args.device.startswith("cuda") else "micro")).split(",") if m]
        self.data: Path = args.data or self.work / "data"
        self.steps_per_s: dict[str, float] = {}

    def checks(self) -> list[Check]:
        device = self.args.device
        checks = [Check("environment", "python, torch, CUDA, onnxruntime providers, TensorRT", self._environment),
                  Check("data", f"compir data synth --out {self.data} (small)", self._synth)]
        for model in self.models:
            checks.append(Check(f"train:{model}", f"compir train --model {model} --steps {self.args.steps} --amp auto --device {device}",
                                partial(self._train, model, device, self.args.steps)))
            if device != "cpu":
                checks.append(Check(f"train-cpu:{model}", f"compir train --model {model} --steps {self.args.cpu_steps} --device cpu",
                                    partial(self._train, model, "cpu", self.args.cpu_steps, against=model)))
        backend = "gloo" if device == "cpu" else "nccl"
        checks += [
            Check("torchrun", f"python -m torch.distributed.run --nproc_per_node 1 -m compir train ({backend})", self._torchrun),
            Check("export", f"compir export onnx <train:{self.models[0]}>/best.pt --variants fp32 --fused (fp32 parity on the CPU)",
                  self._export),
            Check("ort-cuda:pytest", "python -m pytest -m gpu tests", self._pytest_gpu, needs="ort-cuda"),
            Check("ort-cuda:parity", "every fp32 graph: CUDA provider against CPU provider", self._ort_parity, needs="ort-cuda"),
            Check("ort-cuda:latency", "query_encoder batch 1 / 32: onnxruntime CUDA against torch eager", self._latency, needs="ort-cuda"),
            Check("tensorrt", "compir export engine <export> --precision fp16", self._tensorrt, needs="tensorrt"),
        ]
        return checks

    # ---- the checks -----------------------------------------------------------------------------

    def _environment(self) -> CheckResult:
        import torch

        figures: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                                   "cuda": torch.cuda.is_available(), "ort_providers": _ort_providers(),
                                   "tensorrt": _has_module("tensorrt")}
        if torch.cuda.is_available():
            figures["gpu"] = torch.cuda.get_device_name(0)
        if self.args.device.startswith("cuda") and not figures["cuda"]:
            return CheckResult("environment", "FAIL", f"--device {self.args.device} but torch sees no CUDA device", figures=figures)
        detail = ", ".join(f"{k} {v}" for k, v in figures.items() if k != "ort_providers")
        providers = ", ".join(figures["ort_providers"]) or "absent"
        return CheckResult("environment", "PASS", f"{detail}; onnxruntime {providers}", figures=figures)

    def _synth(self) -> CheckResult:
        if self.data.exists():
            return CheckResult("data", "PASS", f"reused {self.data}")
        _run([sys.executable, "-m", "compir", "data", "synth", "--out", str(self.data), "--n-train", "256", "--n-val", "32",
              "--n-test", "32", "--seed", "0"])
        return CheckResult("data", "PASS", f"wrote {self.data}")

    def _train(self, model: str, device: str, steps: int, *, against: str | None = None) -> CheckResult:
        name = f"train-cpu:{model}" if against else f"train:{model}"
        out = self.work / name.replace(":", "-")
        output = _run([sys.executable, "-m", "compir", *self._train_args(model, out, device=device, steps=steps)])
        rate = _steps_per_second(output)
        figures: dict[str, Any] = {"steps_per_s": rate, "device": device, "steps": steps}
        if against is not None:
            cuda = self.steps_per_s.get(against)
            figures["speedup"] = round(cuda / rate, 2) if cuda and rate else None
            speed = f"; {self.args.device} is {figures['speedup']}x the CPU" if figures["speedup"] else ""
            return CheckResult(name, "PASS", f"{rate:.2f} steps/s on the CPU{speed}", figures=figures)
        self.steps_per_s[model] = rate
        losses = json.loads((out / "train_log.json").read_text())["losses"]
        precision = re.search(r"^precision: (.*)$", output, re.MULTILINE)
        figures |= {"first_loss": losses[0], "last_loss": losses[-1], "precision": precision.group(1) if precision else "as configured"}
        quarter = max(1, len(losses) // 4)
        finite = all(math.isfinite(value) for value in losses)
        falling = sum(losses[-quarter:]) / quarter < sum(losses[:quarter]) / quarter
        status = "PASS" if finite and falling else "FAIL"
        detail = (f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} ({'finite' if finite else 'NOT finite'}, "
                  f"{'falling' if falling else 'NOT falling'}), {rate:.2f} steps/s, {figures['precision']}")
        return CheckResult(name, status, detail, figures=figures)

    def _train_args(self, model: str, out: Path, *, device: str, steps: int) -> list[str]:
        return ["train", "--data", str(self.data), "--out", str(out), "--model", model, "--steps", str(steps),
                "--steps-per-epoch", str(steps), "--batch-size", str(self.args.batch_size), "--amp", "auto", "--device", device,
                # A short warm-up: the default (40 steps) would leave a 50-step run warming up.
                "--warmup-steps", str(max(1, steps // 5)),
                "--val-queries", "16", "--workers", "0", "--no-progress"]

    def _torchrun(self) -> CheckResult:
        out = self.work / "torchrun"
        steps = min(self.args.steps, 10)
        env = {**os.environ, "NCCL_DEBUG": "INFO"}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone", "-m", "compir",
                   *self._train_args(self.models[0], out, device=self.args.device, steps=steps)]
        output = _run(command, env=env)
        losses = json.loads((out / "train_log.json").read_text())["losses"]
        nccl = "NCCL INFO" in output
        backend = "nccl" if nccl else "gloo"
        ok = len(losses) == steps and all(math.isfinite(v) for v in losses) and (nccl or self.args.device == "cpu")
        return CheckResult("torchrun", "PASS" if ok else "FAIL", f"{len(losses)} steps in a 1-process {backend} group",
                           figures={"backend": backend, "steps": len(losses)})

    def _export(self) -> CheckResult:
        checkpoint = self.work / f"train-{self.models[0]}" / "best.pt"
        out = self.work / "export"
        _run([sys.executable, "-m", "compir", "export", "onnx", str(checkpoint), "--out", str(out), "--variants", "fp32", "--fused",
              "--calibration-data", str(self.data), "--calibration-count", "8", "--overwrite"])
        parity = json.loads((out / "manifest.json").read_text())["variants"]["fp32"]["parity"]
        worst = max(parity.values())
        return CheckResult("export", "PASS", f"fp32 graphs of the {self.args.device} checkpoint match torch on the CPU "
                           f"(worst max abs diff {worst:.2g})", figures={"parity": parity})

    def _pytest_gpu(self) -> CheckResult:
        output = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], allowed=(0, 5))
        summary = output.strip().splitlines()[-1] if output.strip() else "no output"
        return CheckResult("ort-cuda:pytest", "FAIL" if re.search(r"\d+ (failed|error)", summary) else "PASS", summary)

    def _ort_parity(self) -> CheckResult:
        from compir.devicecheck_measure import provider_parity

        worst = provider_parity(self.work / "export", device=self.args.device)
        status = "PASS" if max(worst.values()) <= 1e-3 else "FAIL"
        detail = ", ".join(f"{role} {d:.2g}" for role, d in worst.items()) + f" max abs diff, {self.args.device} provider vs CPU provider"
        return CheckResult("ort-cuda:parity", status, detail, figures={"max_abs_diff": worst})

    def _latency(self) -> CheckResult:
        from compir.devicecheck_measure import query_latency

        figures = query_latency(self.work / "export", checkpoint=self.work / f"train-{self.models[0]}" / "best.pt",
                                device=self.args.device, rounds=self.args.rounds)
        detail = "; ".join(f"batch {b}: onnxruntime {f['onnxruntime_ms']:.2f} ms, torch {f['torch_ms']:.2f} ms" for b, f in figures.items())
        return CheckResult("ort-cuda:latency", "PASS", detail, figures=figures)

    def _tensorrt(self) -> CheckResult:
        _run([sys.executable, "-m", "compir", "export", "engine", str(self.work / "export"), "--precision", "fp16"])
        return CheckResult("tensorrt", "PASS", "fp16 engines built from the export")


def _run(command: Sequence[str], *, env: dict[str, str] | None = None, allowed: tuple[int, ...] = (0,)) -> str:
    """Run a command; its stdout + stderr, or RuntimeError with their tail when it fails."""
    done = subprocess.run(list(command), capture_output=True, text=True, env=env, check=False)
    output = done.stdout + done.stderr
    if done.returncode not in allowed:
        tail = " | ".join(output.strip().splitlines()[-6:])
        raise RuntimeError(f"`{' '.join(command[:6])} ...` exited {done.returncode}: {tail}")
    return output


def _steps_per_second(output: str) -> float:
    found = re.findall(r"([0-9.]+) steps/s\)", output)
    if not found:
        raise RuntimeError("compir train printed no steps/s line")
    return float(found[-1])


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def _skip_reason(needs: str, device: str) -> str:
    """Why a check cannot run here ('' when it can): on --device cpu the ort-cuda checks run on the CPU provider."""
    if needs == "ort-cuda" and device != "cpu" and "CUDAExecutionProvider" not in _ort_providers():
        return "onnxruntime-gpu is absent (carry it in parts: see scripts/device-wheels.sh)"
    if needs == "tensorrt" and not _has_module("tensorrt"):
        return "TensorRT is absent: engine builds stay untested here (its wheels come only from NVIDIA's index)"
    return ""


def run_checks(args: argparse.Namespace) -> list[CheckResult]:
    """Run (or with ``args.dry_run`` list) every check, printing one line each; later checks go on after a failure."""
    results = []
    for check in DeviceCheck(args).checks():
        reason = _skip_reason(check.needs, args.device)
        if check.name in args.skip:
            result = CheckResult(check.name, "SKIP", "--skip")
        elif args.dry_run:
            result = CheckResult(check.name, "PLAN", check.plan + (f" [would skip: {reason}]" if reason else ""))
        elif reason:
            result = CheckResult(check.name, "SKIP", reason)
        else:
            started = time.monotonic()
            try:
                result = check.run()
            except Exception as exc:  # noqa: BLE001 - one line per failed check, then the next check
                result = CheckResult(check.name, "FAIL", f"{type(exc).__name__}: {exc}")
            result.seconds = time.monotonic() - started
        print(result.line(), flush=True)
        results.append(result)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/device-check.sh", description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default; the GPU machine) or cpu (the rehearsal)")
    parser.add_argument("--models", default=None, help=f"comma-separated model configs (default: {CUDA_MODELS} on cuda, micro on cpu)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per model on --device (default 50)")
    parser.add_argument("--cpu-steps", type=int, default=10, help="the same model's steps on the CPU for steps/s (default 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--data", type=Path, default=None, help="a synthetic dataset to reuse (default: render a small one in WORK)")
    parser.add_argument("--skip", type=lambda v: [n for n in v.split(",") if n], default=[], help="comma-separated check names to skip")
    parser.add_argument("--work", type=Path, default=Path("/tmp/compir-device-check"), help="scratch folder")
    parser.add_argument("--summary", type=Path, default=None, help="JSON summary file (default WORK/summary.json)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per latency figure (median; default 20)")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and what each runs; run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 2 or args.cpu_steps < 1:
        print("device check: --steps must be >= 2 (a falling loss needs two) and --cpu-steps >= 1", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = run_checks(args)
    summary = {"format": "compir.device-check", "schema": 1, "device": args.device, "dry_run": args.dry_run,
               "started": started, "seconds": round(time.time() - started, 1), "checks": [asdict(r) for r in results]}
    path = args.summary or args.work / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"summary: {path}")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
