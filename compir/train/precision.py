"""Mixed precision chosen by measurement, not by what the CPU's name suggests.

bf16 autocast can halve a step's cost on CPUs with native bf16 (AVX-512 BF16 / AMX) and makes it
~50x slower on CPUs that emulate it (AVX2 only: a 512 x 512 matmul took 255 ms in bf16 against
4.6 ms in fp32 on such a machine). So ``--amp auto`` decides in two measured stages:

1. once per process, one small matmul in each dtype (a few ms): where bf16 is not clearly faster
   (emulated), fp32, and that is final;
2. where it is, the model's own first training steps alternate fp32 and bf16 (real steps, nothing
   is wasted) and the faster one is kept: on small models the casts autocast adds can outweigh
   faster matmuls (``tiny-tgcir`` at 32 px: 0.43 s/step fp32 vs 0.51 s bf16 on an AVX-512 BF16 CPU).

An explicit ``--amp bf16`` that the probe finds emulated is kept (the user asked for it) with a
warning. :func:`decide_amp` and :func:`decide_trial` are the pure rules (unit-tested with injected
timings); :func:`choose_amp` measures and applies the first.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from compir.train.options import AMP_MODES

# bf16 must beat fp32 by this factor to be chosen: a step also runs ops that autocast leaves in
# fp32 and adds casts, so a matmul that is barely faster does not make a faster step.
_MIN_SPEEDUP = 1.3
_MIN_STEP_SPEEDUP = 1.05  # whole steps: a real but small gain is worth taking
_PROBE_SIZE = 256  # (256 x 256) @ (256 x 256): ~0.1-2 ms where bf16 is native, ~30 ms where emulated
_PROBE_REPEATS = 5


@dataclass(frozen=True)
class ProbeTimings:
    """Fastest of a few timings of one probe matmul in each dtype (the minimum resists load from other jobs)."""

    fp32_s: float
    bf16_s: float

    @property
    def bf16_speedup(self) -> float:
        return self.fp32_s / max(self.bf16_s, 1e-12)


@dataclass(frozen=True)
class AmpDecision:
    dtype: torch.dtype | None  # None: full fp32
    reason: str  # one line for the run's banner
    warning: str | None = None  # set when the user's explicit choice is likely slow
    trial: bool = False  # bf16 is native here: confirm it against fp32 on the model's first steps (TRIAL_PLAN)

    @property
    def label(self) -> str:
        return "off (fp32)" if self.dtype is None else str(self.dtype).replace("torch.", "")


def decide_amp(mode: str, *, device_type: str, probe: ProbeTimings | None, cuda_bf16: bool = False) -> AmpDecision:
    """The precision rule. ``probe`` is needed for ``auto`` and ``bf16`` on a CPU (else ignored).

    - ``off``: fp32. ``fp16``: fp16 (a GradScaler guards it).
    - CUDA ``auto``: bf16 where the GPU supports it, else fp16 (both are native on GPUs).
    - CPU ``auto``: bf16 only where the probe finds it >= 1.3x faster than fp32, else fp32.
    - CPU ``bf16``: bf16 as asked, with a warning where the probe finds it no faster than fp32.
    """
    if mode not in AMP_MODES:
        raise ValueError(f"amp mode must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if mode == "off":
        return AmpDecision(None, "--amp off")
    if mode == "fp16":
        return AmpDecision(torch.float16, "--amp fp16")
    if device_type == "cuda":
        if mode == "bf16":
            return AmpDecision(torch.bfloat16, "--amp bf16")
        return (AmpDecision(torch.bfloat16, "auto: the GPU has bf16") if cuda_bf16
                else AmpDecision(torch.float16, "auto: the GPU lacks bf16, fp16 with loss scaling"))
    if probe is None:
        raise ValueError("a CPU precision decision needs probe timings")
    measured = (f"probe matmul bf16 {probe.bf16_s * 1e3:.2f} ms vs fp32 {probe.fp32_s * 1e3:.2f} ms "
                f"({probe.bf16_speedup:.2f}x)")
    native = probe.bf16_speedup >= _MIN_SPEEDUP
    if mode == "bf16":
        warning = None if native else (
            f"--amp bf16 looks emulated on this CPU ({measured}): training will be much slower than "
            f"--amp off; use --amp auto or off unless you need bf16")
        return AmpDecision(torch.bfloat16, f"--amp bf16; {measured}", warning)
    if native:
        return AmpDecision(torch.bfloat16, f"auto: bf16 is native on this CPU ({measured}); the first steps compare "
                                           f"it with fp32 on this model", trial=True)
    return AmpDecision(None, f"auto: fp32, bf16 is not faster on this CPU ({measured})")


# The dtypes of the first training steps of a trial (None = fp32). The first step of each dtype
# is a warm-up (kernel selection, allocator) and is not counted.
TRIAL_PLAN: tuple[torch.dtype | None, ...] = (None, None, torch.bfloat16, torch.bfloat16, None, torch.bfloat16)


def decide_trial(step_seconds: dict[torch.dtype | None, list[float]]) -> AmpDecision:
    """Keep bf16 only where the model's own steps ran clearly faster in it (fastest counted step each)."""
    fp32, bf16 = min(step_seconds[None]), min(step_seconds[torch.bfloat16])
    measured = f"model steps fp32 {fp32:.3f} s vs bf16 {bf16:.3f} s"
    if fp32 / max(bf16, 1e-12) >= _MIN_STEP_SPEEDUP:
        return AmpDecision(torch.bfloat16, f"auto: bf16 ({measured})")
    return AmpDecision(None, f"auto: fp32, bf16 is not faster for this model ({measured})")


@functools.cache
def probe_cpu_matmul() -> ProbeTimings:
    """Time one small matmul in fp32 and bf16 on the CPU (a few ms; once per process)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=generator)
    b = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=generator)
    return ProbeTimings(fp32_s=_fastest_matmul_s(a, b), bf16_s=_fastest_matmul_s(a.bfloat16(), b.bfloat16()))


def _fastest_matmul_s(a: torch.Tensor, b: torch.Tensor) -> float:
    a @ b  # warm-up: the first call picks and loads kernels
    times = []
    for _ in range(_PROBE_REPEATS):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return min(times)


def choose_amp(mode: str, device: torch.device) -> AmpDecision:
    """Measure where the rule needs it, then apply :func:`decide_amp`."""
    needs_probe = device.type == "cpu" and mode in ("auto", "bf16")
    cuda_bf16 = device.type == "cuda" and mode == "auto" and torch.cuda.is_bf16_supported()
    return decide_amp(mode, device_type=device.type, probe=probe_cpu_matmul() if needs_probe else None, cuda_bf16=cuda_bf16)
