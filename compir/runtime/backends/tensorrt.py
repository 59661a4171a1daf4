"""Native TensorRT backend: serialized engines listed in ``engines.json`` (:mod:`compir.engines`),
run with device buffers from the CUDA driver API through ctypes (no torch, no pycuda).

``tensorrt`` is imported only when this backend is opened. Engines are checked against the export
(manifest checksum), this device (TensorRT version, SM version) and the manifest's tensor names.
Each engine's buffers are allocated once, for its profile's largest batch (:class:`_BufferPool`);
:meth:`TensorRTBackend.close` frees them, destroys the stream and releases the primary context.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compir.cuda_driver import CudaDriver, host_array, load_driver
from compir.engines import EngineRecord, detect_device, load_engines
from compir.errors import ContractError
from compir.manifest import GraphSpec, manifest_sha256
from compir.runtime.backends.base import check_io

DEFAULT_ENGINE_DIR = "engines"  # relative to the export folder


class _Cuda:
    """The device's primary context (the one TensorRT's CUDA runtime uses) and one stream on it."""

    def __init__(self, device_index: int = 0) -> None:
        self.driver: CudaDriver = load_driver()
        self.device = self.driver.device(device_index)
        self.context = self.driver.retain_primary_context(self.device)
        self.make_current()
        # Flags 0: a blocking stream, ordered with the legacy default stream as well.
        self.stream = self.driver.create_stream()

    def make_current(self) -> None:
        # Each calling thread (e.g. a server worker) needs the context bound before any call.
        self.driver.set_current(self.context)

    def close(self) -> None:
        """Destroy the stream and release the primary context (once; later calls do nothing)."""
        if not self.stream:
            return
        self.make_current()
        self.driver.synchronize(self.stream)
        self.driver.destroy_stream(self.stream)
        self.stream = 0
        self.driver.release_primary_context(self.device)


class _BufferPool:
    """One device buffer and one page-locked host buffer per I/O tensor of an execution context,
    sized once for the profile's largest batch: no cuMemAlloc / cuMemFree (cuMemFree synchronizes
    the device) per call, and host copies that run asynchronously."""

    def __init__(self, driver: CudaDriver, nbytes: dict[str, int]) -> None:
        self._driver = driver
        self.capacity = dict(nbytes)
        self.device: dict[str, int] = {}
        self.host: dict[str, int] = {}
        try:
            for name, size in nbytes.items():
                self.device[name] = driver.alloc(size)
                self.host[name] = driver.alloc_host(size)
        except ContractError:
            self.release()
            raise

    def staging(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The host buffer of ``name`` viewed as an array of ``shape`` (overwritten by the next call)."""
        needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if needed > self.capacity[name]:
            raise ContractError(f"tensor {name!r} of shape {shape} needs {needed} bytes; its buffer holds {self.capacity[name]}")
        return host_array(self.host[name], shape, dtype)

    def release(self) -> None:
        """Free every buffer (the caller has synchronized the stream that used them)."""
        failures = []
        for pointers, free in ((self.device, self._driver.free), (self.host, self._driver.free_host)):
            for pointer in pointers.values():
                try:
                    free(pointer)
                except ContractError as exc:  # free the rest before reporting
                    failures.append(exc)
            pointers.clear()
        if failures:
            raise failures[0]


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
    """One deserialized engine with its execution context and buffer pool (:class:`_BufferPool`).

    Batches larger than the engine's optimization profile are run in chunks, smaller ones padded.
    Calls are serialized (an execution context must not be used by two threads at once).
    """

    def __init__(self, plan: bytes, spec: GraphSpec, *, runtime: Any, cuda: _Cuda, batch_range: tuple[int, int]) -> None:
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
        self._pool = _BufferPool(cuda.driver, self._largest_sizes())
        for name, pointer in self._pool.device.items():  # fixed addresses: set once, valid for every call
            self._context.set_tensor_address(name, pointer)

    def _largest_sizes(self) -> dict[str, int]:
        """Bytes of every I/O tensor at the profile's largest batch and token count (outputs as the
        context infers them)."""
        high = self._batch_range[1]
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self._inputs:
            largest = tuple(self._engine.get_tensor_profile_shape(name, 0)[2])  # (min, opt, max) of profile 0
            shapes[name] = (high, *largest[1:])
            if not self._context.set_input_shape(name, shapes[name]):
                raise ContractError(f"the {self.spec.role} engine refuses input {name!r} of shape {shapes[name]} (its profile's largest)")
        for name in self._outputs:
            shapes[name] = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shapes[name]):
                raise ContractError(f"the {self.spec.role} engine cannot size output {name!r} ({shapes[name]}) at batch {high}")
        return {name: int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize for name, shape in shapes.items()}

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        wanted = list(outputs) if outputs is not None else [o.name for o in self.spec.outputs]
        unknown = [name for name in wanted if name not in self._outputs]
        if unknown:
            raise ContractError(f"the {self.spec.role} engine has no output(s) {unknown} (it has {self._outputs})")
        arrays = {name: np.ascontiguousarray(feeds[name], dtype=self._dtypes[name]) for name in self._inputs}
        total = _batch_size(arrays, self.spec.role)
        if total == 0:
            return {name: np.empty((0, *(max(d, 0) for d in self._shapes[name][1:])), dtype=self._dtypes[name]) for name in wanted}
        low, high = self._batch_range
        parts = []
        with self._lock:
            if not self._pool.device:
                raise ContractError(f"the {self.spec.role} engine's session is closed")
            self._cuda.make_current()
            for start, stop, size in batch_plan(total, min_batch=low, max_batch=high):
                chunk = {name: _pad_rows(array[start:stop], size) for name, array in arrays.items()}
                results = self._run_once(chunk)
                parts.append({name: results[name][: stop - start] for name in wanted})
        return {name: parts[0][name] if len(parts) == 1 else np.concatenate([p[name] for p in parts]) for name in wanted}

    def _run_once(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, driver, pool = self._cuda, self._cuda.driver, self._pool
        staged_outputs: dict[str, np.ndarray] = {}
        try:
            for name, array in arrays.items():
                if not self._context.set_input_shape(name, array.shape):
                    raise ContractError(f"the {self.spec.role} engine refuses input {name!r} of shape {array.shape} (outside its profile?)")
                staged = pool.staging(name, array.shape, self._dtypes[name])
                np.copyto(staged, array)
                driver.copy_to_device(pool.device[name], staged, cuda.stream)
            for name in self._outputs:  # TensorRT writes every output, wanted or not
                shape = tuple(self._context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ContractError(f"the {self.spec.role} engine cannot size output {name!r} ({shape}) for these inputs")
                staged_outputs[name] = pool.staging(name, shape, self._dtypes[name])
            if not self._context.execute_async_v3(cuda.stream):
                raise ContractError(f"TensorRT failed to run the {self.spec.role} engine")
            for name, staged in staged_outputs.items():  # ordered after the engine on the same stream
                driver.copy_to_host(staged, pool.device[name], cuda.stream)
        finally:
            # The host buffers are reused by the next call: every queued copy ends here, also on errors.
            driver.synchronize(cuda.stream)
        return {name: staged.copy() for name, staged in staged_outputs.items()}

    def close(self) -> None:
        """Free the buffer pool; the context and engine go first (they hold its addresses)."""
        with self._lock:
            if not self._pool.device:
                return
            self._cuda.make_current()
            self._cuda.driver.synchronize(self._cuda.stream)
            self._context = None
            self._engine = None
            self._pool.release()


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
        self.device = detect_device()  # also refuses a TensorRT other than 10.x
        self.engines = load_engines(self.engine_dir, manifest_sha256=manifest_sha256(self.export_dir), device=self.device)
        self._cuda = _Cuda()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._sessions: list[TensorRTSession] = []

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
        self._sessions.append(session)
        return session

    def close(self) -> None:
        """Free every engine's buffers, destroy the stream and release the primary context."""
        for session in self._sessions:
            session.close()
        self._sessions.clear()
        self._cuda.close()

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "tensorrt": self.device.tensorrt_version,
            "gpu": self.device.gpu_name,
            "precision": self.engines.precision,
            "providers": {session.spec.role: ["TensorRT"] for session in self._sessions},
        }
