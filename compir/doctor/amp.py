"""What ``compir train --amp auto`` would pick on this machine, and why: asked of the training code's
own :func:`compir.train.precision.choose_amp` (its timed bf16 probe on a CPU), never re-derived here.
torch is imported only inside :func:`amp_section`, and only where it is installed."""

from __future__ import annotations

from compir.doctor.report import Section


def amp_section() -> Section:
    try:
        import torch
    except ImportError:
        return Section("amp", "torch is not installed: no training here (the runtime needs none)", {"torch": None},
                       ("training (and --amp): pip install 'compir[train]'",))
    from compir.train.distributed import resolve_device
    from compir.train.precision import choose_amp

    device = resolve_device("auto")  # compir train's device unless --device says otherwise
    decision = choose_amp("auto", device)
    return Section(
        "amp", f"--amp auto on {device.type}: {decision.label}; {decision.reason}",
        {"torch": str(torch.__version__), "torch_cuda": torch.version.cuda, "device": device.type, "label": decision.label,
         "dtype": None if decision.dtype is None else str(decision.dtype).replace("torch.", ""), "trial": decision.trial,
         "reason": decision.reason},
    )
