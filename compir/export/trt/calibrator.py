"""int8 calibration for TensorRT: real gallery images and texts, fed through an
``IInt8EntropyCalibrator2`` (implicit quantization).

TensorRT 10.1 deprecates the calibrator classes in favour of explicit quantization (Q/DQ nodes,
which the ``int8-static`` ONNX variant already has) and TensorRT 11 removes them; building from
the ``int8-static`` variant needs no calibrator at all (see :mod:`.engine_build`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compir.contracts import atomic_write_bytes, sha256_file
from compir.errors import ContractError
from compir.export.graphs import graph_inputs, select_batch
from compir.export.parity import open_session, run_session
from compir.export.samples import Samples
from compir.manifest import IMAGE_ENCODER, TEXT_ENCODER, TOKEN_MAPPER, external_data_path


def calibration_feeds(
    graphs: dict[str, Path], samples: Samples, *, roles: Sequence[str], prompt_ids: np.ndarray | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Feeds of each of ``roles`` from real samples; composer (zero-shot: token mapper and prompt encoder) inputs
    come from the fp32 graphs in ``graphs``; ``prompt_ids``: the samples' texts in a zero-shot export's template."""
    features = {
        "image_features": run_session(open_session(graphs[IMAGE_ENCODER]), {"pixel_values": samples.pixel_values})["image_features"],
        "text_features": run_session(open_session(graphs[TEXT_ENCODER]), {"input_ids": samples.input_ids})["text_features"],
    }
    if TOKEN_MAPPER in graphs:
        mapped = run_session(open_session(graphs[TOKEN_MAPPER]), {"image_features": features["image_features"]})
        features["pseudo_tokens"] = mapped["pseudo_tokens"]
    return {
        role: graph_inputs(role, pixel_values=samples.pixel_values, input_ids=samples.input_ids, features=features, prompt_ids=prompt_ids)
        for role in roles
    }


def split_batches(feeds: dict[str, np.ndarray], *, batch: int) -> list[dict[str, np.ndarray]]:
    """Full batches of ``batch`` rows (TensorRT calibrates at one fixed shape, so the tail is dropped)."""
    count = len(next(iter(feeds.values())))
    if count < batch:
        raise ContractError(f"int8 calibration needs at least {batch} samples, got {count}; pass more --calibration-data")
    return [select_batch(feeds, range(start, start + batch)) for start in range(0, count - batch + 1, batch)]


def calibration_digest(onnx_path: Path, batches: Sequence[dict[str, np.ndarray]]) -> str:
    """A short digest of the graph file and the calibration data, to name a calibration cache by.

    TensorRT trusts whatever cache ``read_calibration_cache`` returns (re-calibrating after the
    weights or the data change is the application's job), so a cache is only reused for the same
    ONNX file and the same calibration batches.
    """
    digest = hashlib.sha256(sha256_file(onnx_path).encode("ascii"))
    weights = external_data_path(onnx_path)  # a big graph's weights live beside it, not in the file
    if weights.is_file():
        digest.update(sha256_file(weights).encode("ascii"))
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def check_batches(batches: Sequence[dict[str, np.ndarray]], *, inputs: Sequence[str], batch: int) -> None:
    """ContractError unless every batch holds exactly ``inputs``, each with ``batch`` rows."""
    if not batches:
        raise ContractError("int8 calibration got no batches")
    for index, feeds in enumerate(batches):
        if sorted(feeds) != sorted(inputs):
            raise ContractError(f"calibration batch {index} has inputs {sorted(feeds)}, the network has {sorted(inputs)}")
        rows = {name: len(array) for name, array in feeds.items()}
        if set(rows.values()) != {batch}:
            raise ContractError(f"calibration batch {index} has rows {rows}; the calibration profile runs batch {batch}")


def make_calibrator(batches: Sequence[dict[str, np.ndarray]], *, cache_file: Path | None = None) -> Any:
    """An ``IInt8EntropyCalibrator2`` over ``batches`` (device copies through torch.cuda).

    TensorRT calls ``get_batch`` from C++ code that must not throw: an exception raised there would
    abort the process, so it is kept in ``failure`` (and calibration stopped) for the builder to raise.
    """
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise ContractError("int8 calibration needs CUDA (torch.cuda is not available on this machine)")

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = list(batches)
            self._next = 0
            self._device: dict[str, Any] = {}  # keeps the current batch alive on the GPU
            self.failure: BaseException | None = None

        def get_batch_size(self) -> int:
            return int(len(next(iter(self._batches[0].values()))))

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            try:
                return self._device_batch(list(names))
            except Exception as exc:  # never let it cross TensorRT's noexcept callback
                self.failure = exc
                return None

        def _device_batch(self, names: list[str]) -> list[int] | None:
            if self._next >= len(self._batches):
                return None
            feeds = self._batches[self._next]
            self._next += 1
            missing = [name for name in names if name not in feeds]
            if missing:
                raise ContractError(f"calibration batch lacks input(s) {missing}")
            self._device = {name: torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda() for name in names}
            torch.cuda.synchronize()  # the copies are done before TensorRT reads the buffers
            return [int(self._device[name].data_ptr()) for name in names]

        def read_calibration_cache(self) -> bytes | None:
            if cache_file is not None and cache_file.is_file():
                return cache_file.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                if cache_file is not None:
                    atomic_write_bytes(cache_file, bytes(cache))
            except Exception as exc:  # noexcept callback as well
                self.failure = exc

    return _EntropyCalibrator()
