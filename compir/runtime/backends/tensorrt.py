"""Native TensorRT backend: serialized engines listed in ``engines.json`` (:mod:`compir.engines`),
run with device buffers from the CUDA driver API through ctypes (no torch, no pycuda).

``tensorrt`` is imported only when this backend is opened. Engines are checked against the export
(manifest checksum), this device (TensorRT version, SM version) and the manifest's tensor names.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compir.cuda_driver import CudaDriver, load_driver
from compir.engines import EngineRecord, detect_device, load_engines
from compir.errors import ContractError
from compir.manifest import GraphSpec, manifest_sha256
from compir.runtime.backends.base import check_io

DEFAULT_ENGINE_DIR = "engines"  # relative to the export folder


class _Cuda:
    """The device's primary context (the one TensorRT's CUDA runtime uses) and one stream on it."""

    def __init__(self, device_index: int = 0) -> None:
        self.driver: CudaDriver = load_driver()
        self.context = self.driver.retain_primary_context(self.driver.device(device_index))
        self.make_current()
        # Flags 0: a blocking stream, ordered with the legacy default stream as well.
        self.stream = self.driver.create_stream()

    def make_current(self) -> None:
        # Each calling thread (e.g. a server worker) needs the context bound before any call.
        self.driver.set_current(self.context)


def batch_plan(total: int, *, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """(start, stop, run size) of each engine call for ``total`` rows: at most ``max_batch`` rows
    per call, and a last call below ``min_batch`` padded up to it (rows are independent)."""
    plan = []
    for start in range(0, total, max_batch):
        stop = min(start + max_batch, total)
        plan.append((start, stop, max(stop - start, min_batch)))
    return plan


def _pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    if len(array) >= size:
        return array
    return np.ascontiguousarray(np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)]))


def profile_batch_range(record: EngineRecord) -> tuple[int, int]:
    """The batch sizes every input of the engine's optimization profile accepts."""
    ranges = list(record.profile.values())
    low, high = max(r.min[0] for r in ranges), min(r.max[0] for r in ranges)
    if low > high:
        raise ContractError(f"engine {record.role!r}: its inputs' batch ranges do not overlap; rebuild it")
    return low, high


class TensorRTSession:
    """One deserialized engine; buffers are allocated per call (shapes vary with the batch).

    Batches larger than the engine's optimization profile are run in chunks, smaller ones padded.
    Calls are serialized (an execution context must not be used by two threads at once).
    """

    def __init__(self, plan: bytes, spec: GraphSpec, *, runtime: Any, cuda: _Cuda, batch_range: tuple[int, int] = (1, 1 << 30)) -> None:
        import tensorrt as trt

        self.spec = spec
        self._cuda = cuda
        self._runtime = runtime  # the runtime must outlive the engines it deserialized
        self._batch_range = batch_range
        self._lock = threading.Lock()
        cuda.make_current()
        self._engine = runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ContractError(f"TensorRT could not deserialize the {spec.role} engine; rebuild it on this device")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ContractError(f"TensorRT could not create an execution context for the {spec.role} engine (GPU memory?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtypes = {n: _numpy_dtype(trt, self._engine.get_tensor_dtype(n), n, spec.role) for n in names}
        self._shapes = {n: tuple(self._engine.get_tensor_shape(n)) for n in names}
        described = {n: (self._dtypes[n].name, [d if d >= 0 else "dynamic" for d in self._shapes[n]]) for n in names}
        check_io(
            spec,
            inputs=[(n, *described[n]) for n in self._inputs],
            outputs=[(n, *described[n]) for n in self._outputs],
        )

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        wanted = list(outputs) if outputs is not None else [o.name for o in self.spec.outputs]
        unknown = [name for name in wanted if name not in self._outputs]
        if unknown:
            raise ContractError(f"the {self.spec.role} engine has no output(s) {unknown} (it has {self._outputs})")
        arrays = {name: np.ascontiguousarray(feeds[name], dtype=self._dtypes[name]) for name in self._inputs}
        total = _batch_size(arrays, self.spec.role)
        if total == 0:
            return {name: np.empty((0, *self._shapes[name][1:]), dtype=self._dtypes[name]) for name in wanted}
        low, high = self._batch_range
        parts = []
        with self._lock:
            self._cuda.make_current()
            for start, stop, size in batch_plan(total, min_batch=low, max_batch=high):
                chunk = {name: _pad_rows(array[start:stop], size) for name, array in arrays.items()}
                results = self._run_once(chunk)
                parts.append({name: results[name][: stop - start] for name in wanted})
        return {name: parts[0][name] if len(parts) == 1 else np.concatenate([p[name] for p in parts]) for name in wanted}

    def _run_once(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, driver = self._cuda, self._cuda.driver
        allocated: list[int] = []
        staged = {name: np.ascontiguousarray(rows) for name, rows in arrays.items()}  # alive until the sync below
        try:
            for name, array in staged.items():
                if not self._context.set_input_shape(name, array.shape):
                    raise ContractError(f"the {self.spec.role} engine refuses input {name!r} of shape {array.shape} (outside its profile?)")
                pointer = driver.alloc(array.nbytes)
                allocated.append(pointer)
                driver.copy_to_device(pointer, array, cuda.stream)
                self._context.set_tensor_address(name, pointer)
            results: dict[str, np.ndarray] = {}
            pointers: dict[str, int] = {}
            for name in self._outputs:  # TensorRT needs an address for every output
                shape = tuple(self._context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ContractError(f"the {self.spec.role} engine cannot size output {name!r} ({shape}) for these inputs")
                results[name] = np.empty(shape, dtype=self._dtypes[name])
                pointers[name] = driver.alloc(results[name].nbytes)
                allocated.append(pointers[name])
                self._context.set_tensor_address(name, pointers[name])
            if not self._context.execute_async_v3(cuda.stream):
                raise ContractError(f"TensorRT failed to run the {self.spec.role} engine")
            for name, array in results.items():  # ordered after the engine on the same stream
                driver.copy_to_host(array, pointers[name], cuda.stream)
            driver.synchronize(cuda.stream)
            return results
        finally:
            _release(driver, cuda.stream, allocated)


def _release(driver: CudaDriver, stream: int, pointers: list[int]) -> None:
    """Free device buffers once the stream is done with them (also on the error path)."""
    if not pointers:
        return
    try:
        driver.synchronize(stream)
    finally:
        failures = []
        for pointer in pointers:
            try:
                driver.free(pointer)
            except ContractError as exc:  # free the rest before reporting
                failures.append(exc)
        if failures:
            raise failures[0]


def _batch_size(arrays: dict[str, np.ndarray], role: str) -> int:
    sizes = {name: (len(array) if array.ndim else -1) for name, array in arrays.items()}
    if len(set(sizes.values())) != 1 or -1 in sizes.values():
        raise ContractError(f"{role} inputs must share their first (batch) axis, got {sizes}")
    return next(iter(sizes.values()))


def _numpy_dtype(trt: Any, dtype: Any, name: str, role: str) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError as exc:
        raise ContractError(f"the {role} engine's tensor {name!r} has type {dtype}, which has no numpy equivalent; re-export") from exc


class TensorRTBackend:
    """Opens the engines built from one export folder (``compir export engine``)."""

    name = "tensorrt"

    def __init__(self, export_dir: str | Path, *, engine_dir: str | Path | None = None) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise ContractError("the tensorrt backend needs TensorRT: pip install 'compir[gpu]' on the GPU machine") from exc
        self.export_dir = Path(export_dir)
        self.engine_dir = Path(engine_dir) if engine_dir is not None else self.export_dir / DEFAULT_ENGINE_DIR
        self.device = detect_device()
        self.engines = load_engines(self.engine_dir, manifest_sha256=manifest_sha256(self.export_dir), device=self.device)
        self._cuda = _Cuda()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._opened: list[str] = []

    @property
    def variant(self) -> str:
        return self.engines.variant

    def open(self, graph: GraphSpec) -> TensorRTSession:
        record = self.engines.engine(graph.role)
        session = TensorRTSession(
            (self.engine_dir / record.file).read_bytes(),
            graph,
            runtime=self._runtime,
            cuda=self._cuda,
            batch_range=profile_batch_range(record),
        )
        self._opened.append(graph.role)
        return session

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "tensorrt": self.device.tensorrt_version,
            "gpu": self.device.gpu_name,
            "precision": self.engines.precision,
            "providers": {role: ["TensorRT"] for role in self._opened},
        }
