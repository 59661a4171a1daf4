"""The mixed-precision rule, with injected probe timings: no test depends on the CPU it runs on."""

from __future__ import annotations

import pytest
import torch

from compir.train.precision import TRIAL_PLAN, ProbeTimings, choose_amp, decide_amp, decide_trial, probe_cpu_matmul

NATIVE = ProbeTimings(fp32_s=3.5e-3, bf16_s=0.6e-3)  # AVX-512 BF16: bf16 ~6x faster
EMULATED = ProbeTimings(fp32_s=4.6e-3, bf16_s=255e-3)  # AVX2 only: bf16 ~55x slower
MARGINAL = ProbeTimings(fp32_s=1.0e-3, bf16_s=0.9e-3)  # faster, but not by enough to pay for casts


def test_auto_on_cpu_takes_bf16_only_where_it_is_clearly_faster() -> None:
    native = decide_amp("auto", device_type="cpu", probe=NATIVE)
    assert native.dtype == torch.bfloat16 and "native" in native.reason and native.warning is None
    emulated = decide_amp("auto", device_type="cpu", probe=EMULATED)
    assert emulated.dtype is None and "not faster" in emulated.reason and emulated.warning is None
    assert "255.00 ms" in emulated.reason and "4.60 ms" in emulated.reason  # the measurement is printed
    assert decide_amp("auto", device_type="cpu", probe=MARGINAL).dtype is None


def test_explicit_bf16_is_kept_but_warned_about_where_emulated() -> None:
    emulated = decide_amp("bf16", device_type="cpu", probe=EMULATED)
    assert emulated.dtype == torch.bfloat16
    assert emulated.warning is not None and "emulated" in emulated.warning
    assert decide_amp("bf16", device_type="cpu", probe=NATIVE).warning is None


def test_off_fp16_and_cuda_need_no_probe() -> None:
    assert decide_amp("off", device_type="cpu", probe=None).dtype is None
    assert decide_amp("fp16", device_type="cpu", probe=None).dtype == torch.float16
    assert decide_amp("auto", device_type="cuda", probe=None, cuda_bf16=True).dtype == torch.bfloat16
    assert decide_amp("auto", device_type="cuda", probe=None, cuda_bf16=False).dtype == torch.float16
    with pytest.raises(ValueError, match="probe"):
        decide_amp("auto", device_type="cpu", probe=None)
    with pytest.raises(ValueError, match="amp mode"):
        decide_amp("fp8", device_type="cpu", probe=NATIVE)


def test_the_probe_measures_once_per_process_and_the_decision_follows_it() -> None:
    first = probe_cpu_matmul()
    assert probe_cpu_matmul() is first  # cached: a few ms, paid once
    assert first.fp32_s > 0 and first.bf16_s > 0
    decision = choose_amp("auto", torch.device("cpu"))
    assert decision == decide_amp("auto", device_type="cpu", probe=first)


def test_native_bf16_is_confirmed_on_the_models_own_steps() -> None:
    assert decide_amp("auto", device_type="cpu", probe=NATIVE).trial
    assert not decide_amp("auto", device_type="cpu", probe=EMULATED).trial  # emulated: fp32 is final
    assert not decide_amp("bf16", device_type="cpu", probe=NATIVE).trial  # explicit: as asked
    # A small model where autocast's casts outweigh faster matmuls keeps fp32 ...
    slower = decide_trial({None: [0.43, 0.44], torch.bfloat16: [0.51, 0.52]})
    assert slower.dtype is None and "0.430 s" in slower.reason and "0.510 s" in slower.reason
    # ... a bigger one where bf16 wins keeps bf16; a tie keeps fp32 (no precision lost for nothing).
    assert decide_trial({None: [0.9], torch.bfloat16: [0.5, 0.6]}).dtype == torch.bfloat16
    assert decide_trial({None: [0.50], torch.bfloat16: [0.49]}).dtype is None
    assert TRIAL_PLAN.count(None) >= 2 and TRIAL_PLAN.count(torch.bfloat16) >= 2  # a warm-up plus a timed step each
