"""Native TensorRT backend: serialized engines listed in ``engines.json`` (:mod:`compir.engines`),
run with device buffers from the CUDA driver API through ctypes (no torch, no pycuda).

``tensorrt`` is imported only when this backend is opened. Engines are checked against the export
(manifest checksum), this device (TensorRT version, SM version) and the manifest's tensor names.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compir.engines import detect_device, load_engines
from compir.errors import ContractError
from compir.manifest import GraphSpec, manifest_sha256
from compir.runtime.backends.base import check_io

DEFAULT_ENGINE_DIR = "engines"  # relative to the export folder


class _Cuda:
    """The few CUDA driver calls the backend needs, on the device's primary context."""

    def __init__(self, device_index: int = 0) -> None:
        self.lib = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")
        self._call(self.lib.cuInit(0), "cuInit")
        device = ctypes.c_int()
        self._call(self.lib.cuDeviceGet(ctypes.byref(device), device_index), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self._call(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), device), "cuDevicePrimaryCtxRetain")
        self.make_current()
        self.stream = ctypes.c_void_p()
        self._call(self.lib.cuStreamCreate(ctypes.byref(self.stream), 0), "cuStreamCreate")

    def make_current(self) -> None:
        # Each calling thread (e.g. a server worker) needs the context bound before any call.
        self._call(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def alloc(self, nbytes: int) -> int:
        pointer = ctypes.c_uint64()
        self._call(self.lib.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 1))), "cuMemAlloc")
        return int(pointer.value)

    def free(self, pointer: int) -> None:
        self.lib.cuMemFree_v2(ctypes.c_uint64(pointer))

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        self._call(self.lib.cuMemcpyHtoD_v2(ctypes.c_uint64(pointer), array.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(array.nbytes)), "cuMemcpyHtoD")

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        self._call(self.lib.cuMemcpyDtoH_v2(array.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(pointer), ctypes.c_size_t(array.nbytes)), "cuMemcpyDtoH")

    def synchronize(self) -> None:
        self._call(self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    @staticmethod
    def _call(result: int, what: str) -> None:
        if result != 0:
            raise ContractError(f"CUDA driver call {what} failed with error {result}")


class TensorRTSession:
    """One deserialized engine; buffers are allocated per call (shapes vary with the batch)."""

    def __init__(self, plan: bytes, spec: GraphSpec, *, runtime: Any, cuda: _Cuda) -> None:
        import tensorrt as trt

        self.spec = spec
        self._cuda = cuda
        self._engine = runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ContractError(f"TensorRT could not deserialize the {spec.role} engine; rebuild it on this device")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        described = {n: (self._dtypes[n].name, [d if d >= 0 else "dynamic" for d in self._engine.get_tensor_shape(n)]) for n in names}
        check_io(
            spec,
            inputs=[(n, *described[n]) for n in self._inputs],
            outputs=[(n, *described[n]) for n in names if n not in self._inputs],
        )

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        cuda = self._cuda
        cuda.make_current()
        wanted = list(outputs) if outputs is not None else [o.name for o in self.spec.outputs]
        allocated: list[int] = []
        try:
            for name in self._inputs:
                array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                self._context.set_input_shape(name, array.shape)
                pointer = cuda.alloc(array.nbytes)
                allocated.append(pointer)
                cuda.to_device(pointer, array)
                self._context.set_tensor_address(name, pointer)
            results: dict[str, np.ndarray] = {}
            for output in self.spec.outputs:  # TensorRT needs an address for every output
                shape = tuple(self._context.get_tensor_shape(output.name))
                results[output.name] = np.empty(shape, dtype=self._dtypes[output.name])
                pointer = cuda.alloc(results[output.name].nbytes)
                allocated.append(pointer)
                self._context.set_tensor_address(output.name, pointer)
            if not self._context.execute_async_v3(cuda.stream.value or 0):
                raise ContractError(f"TensorRT failed to run the {self.spec.role} engine")
            cuda.synchronize()
            for output, pointer in zip(self.spec.outputs, allocated[len(self._inputs):]):
                if output.name in wanted:
                    cuda.to_host(results[output.name], pointer)
            return {name: results[name] for name in wanted}
        finally:
            for pointer in allocated:
                cuda.free(pointer)


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
        session = TensorRTSession((self.engine_dir / record.file).read_bytes(), graph, runtime=self._runtime, cuda=self._cuda)
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
