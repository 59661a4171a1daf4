"""int8 calibration for TensorRT: real gallery images and texts, fed through an
``IInt8EntropyCalibrator2`` (implicit quantization).

TensorRT 10.1 deprecates the calibrator classes in favour of explicit quantization (Q/DQ nodes,
which the ``int8-static`` ONNX variant already has) and TensorRT 11 removes them; building from
the ``int8-static`` variant needs no calibrator at all (see :mod:`.engine_build`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compir.contracts import atomic_write_bytes
from compir.errors import ContractError
from compir.export.graphs import graph_inputs, select_batch
from compir.export.parity import open_session, run_session
from compir.export.samples import Samples
from compir.manifest import IMAGE_ENCODER, TEXT_ENCODER


def calibration_feeds(graphs: dict[str, Path], samples: Samples, *, roles: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Feeds of each of ``roles`` from real samples; composer inputs come from the fp32 encoders in ``graphs``."""
    features = {
        "image_features": run_session(open_session(graphs[IMAGE_ENCODER]), {"pixel_values": samples.pixel_values})["image_features"],
        "text_features": run_session(open_session(graphs[TEXT_ENCODER]), {"input_ids": samples.input_ids})["text_features"],
    }
    return {
        role: graph_inputs(role, pixel_values=samples.pixel_values, input_ids=samples.input_ids, features=features)
        for role in roles
    }


def split_batches(feeds: dict[str, np.ndarray], *, batch: int) -> list[dict[str, np.ndarray]]:
    """Full batches of ``batch`` rows (TensorRT calibrates at one fixed shape, so the tail is dropped)."""
    count = len(next(iter(feeds.values())))
    if count < batch:
        raise ContractError(f"int8 calibration needs at least {batch} samples, got {count}; pass more --calibration-data")
    return [select_batch(feeds, range(start, start + batch)) for start in range(0, count - batch + 1, batch)]


def make_calibrator(batches: Sequence[dict[str, np.ndarray]], *, cache_file: Path | None = None) -> Any:
    """An ``IInt8EntropyCalibrator2`` over ``batches`` (device copies through torch.cuda)."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise ContractError("int8 calibration needs CUDA (torch.cuda is not available on this machine)")

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = list(batches)
            self._next = 0
            self._device: dict[str, Any] = {}  # keeps the current batch alive on the GPU

        def get_batch_size(self) -> int:
            return int(len(next(iter(self._batches[0].values()))))

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            if self._next >= len(self._batches):
                return None
            feeds = self._batches[self._next]
            self._next += 1
            missing = [name for name in names if name not in feeds]
            if missing:
                raise ContractError(f"calibration batch lacks input(s) {missing}")
            self._device = {name: torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda() for name in names}
            return [int(self._device[name].data_ptr()) for name in names]

        def read_calibration_cache(self) -> bytes | None:
            if cache_file is not None and cache_file.is_file():
                return cache_file.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_file is not None:
                atomic_write_bytes(cache_file, bytes(cache))

    return _EntropyCalibrator()
