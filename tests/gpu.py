"""Skips for the gpu-marked tests: ``tensorrt`` and onnxruntime-gpu import (and list their providers)
on machines without an NVIDIA driver or GPU, so an import is not proof that a GPU is there."""

from __future__ import annotations

import pytest

from compir.errors import ContractError


def require_cuda_device() -> None:
    """Skip with the reason unless the CUDA driver loads and reports device 0."""
    from compir.cuda_driver import load_driver

    try:
        load_driver().device(0)
    except ContractError as exc:
        pytest.skip(f"no usable NVIDIA GPU here ({exc})")


def require_tensorrt_gpu() -> None:
    """Skip with the reason unless TensorRT imports and a GPU answers."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (engines are built on the GPU device)")
    require_cuda_device()
