"""Backends that run an export's graphs: ``onnxruntime`` (TensorRT EP / CUDA EP / CPU) and
``tensorrt`` (native engines). Each is imported only when chosen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from compir.errors import InputError
from compir.runtime.backends.base import Backend, GraphSession, check_io

BACKENDS = ("onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "Backend", "GraphSession", "check_io", "open_backend"]


def open_backend(
    name: str, export_dir: str | Path, *, providers: Sequence[str] | None = None, spinning: bool = False, threads: int = 0
) -> Backend:
    """The backend called ``name`` for ``export_dir``; ``providers``, ``spinning`` (idle pool
    threads busy-wait: lower latency per call, CPU taken from other work) and ``threads`` (pool
    size, 0: one per core) only apply to onnxruntime."""
    if name == "onnxruntime":
        from compir.runtime.backends.ort import OrtBackend

        return OrtBackend(export_dir, providers=providers, spinning=spinning, threads=threads)
    if name == "tensorrt":
        from compir.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(export_dir)
    raise InputError(f"unknown backend {name!r}; choose one of {BACKENDS}")
