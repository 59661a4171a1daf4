"""FastViT towers (MobileCLIP-S*, MobileCLIP2-S*) train and encode on the CPU with oneDNN off, forward and
backward, and say so; every other tower keeps oneDNN. Observed on every convolution of a real
``compir train`` step (and its validation), through hooks that record the flag when each runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from compir.train.loop import TrainOptions, train

open_clip = pytest.importorskip("open_clip")


@pytest.fixture
def conv_flags() -> Iterator[dict[str, list[bool]]]:
    """``torch.backends.mkldnn.enabled`` as each Conv2d runs forward, and as each one's weight gradient is computed."""
    seen: dict[str, list[bool]] = {"forward": [], "backward": []}

    def record_backward(grad: torch.Tensor) -> None:
        seen["backward"].append(torch.backends.mkldnn.enabled)

    def before_forward(module: torch.nn.Module, inputs: Any) -> None:
        if isinstance(module, torch.nn.Conv2d):
            seen["forward"].append(torch.backends.mkldnn.enabled)
            if module.weight.requires_grad and not getattr(module.weight, "_flag_hooked", False):
                module.weight.register_hook(record_backward)
                module.weight._flag_hooked = True  # type: ignore[attr-defined]

    handle = torch.nn.modules.module.register_module_forward_pre_hook(before_forward)
    yield seen
    handle.remove()


def _train_one_step(model: str, data: Path, out: Path) -> None:
    train(TrainOptions(data=data, out_dir=out, model=model, epochs=1, steps_per_epoch=1, batch_size=4, amp="off",
                       val_queries=4, progress=False, device="cpu"))


def test_a_fastvit_tower_runs_without_onednn_on_the_cpu(conv_flags: dict[str, list[bool]], synth_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.bench_coverage import shrink

    config = tmp_path / "mobileclip-s1.json"  # MobileCLIP-S1's FastViT (fastvit_mci1), shrunk: one block per stage
    config.write_text(json.dumps({"open_clip": shrink(open_clip.get_model_config("MobileCLIP-S1"))}), encoding="utf-8")
    assert torch.backends.mkldnn.enabled
    _train_one_step(str(config), synth_data, tmp_path / "run")
    assert conv_flags["forward"] and conv_flags["backward"]
    assert not any(conv_flags["forward"]) and not any(conv_flags["backward"]), conv_flags
    assert torch.backends.mkldnn.enabled  # set back after each block
    assert "FastViT: oneDNN off on the CPU" in capsys.readouterr().out


def test_other_towers_keep_onednn(conv_flags: dict[str, list[bool]], synth_data: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _train_one_step("micro", synth_data, tmp_path / "run")  # a ViT: its patch embedding is a Conv2d
    assert conv_flags["forward"] and conv_flags["backward"]
    assert all(conv_flags["forward"]) and all(conv_flags["backward"]), conv_flags
    assert "oneDNN" not in capsys.readouterr().out
