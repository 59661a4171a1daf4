"""The few CUDA driver API calls compir makes, through ctypes (no torch, no pycuda, no cuda-python).

Used by :func:`compir.engines.detect_device` and the runtime's TensorRT backend. Every function
gets its C prototype (``argtypes``/``restype``) before it is called, so 64-bit ``CUdeviceptr``
values and host pointers are never squeezed through ctypes' default C ``int``; every ``CUresult``
is checked and reported by name (``cuGetErrorName``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import numpy as np

from compir.errors import ContractError

CUresult = ctypes.c_int  # an enum: C int
CUdevice = ctypes.c_int
CUdeviceptr = ctypes.c_uint64  # unsigned long long on every 64-bit platform CUDA supports
CUcontext = ctypes.c_void_p
CUstream = ctypes.c_void_p

# CUdevice_attribute values (cuda.h; stable since CUDA 2.x).
COMPUTE_CAPABILITY_MAJOR = 75
COMPUTE_CAPABILITY_MINOR = 76

# The exported symbol -> its parameter types (cuda.h); every one returns CUresult. The _v2 names are
# what cuda.h maps cuMemAlloc & co. to since CUDA 3.2 (64-bit CUdeviceptr and size_t sizes).
SIGNATURES: dict[str, tuple[Any, ...]] = {
    "cuInit": (ctypes.c_uint,),
    "cuDriverGetVersion": (ctypes.POINTER(ctypes.c_int),),
    "cuDeviceGetCount": (ctypes.POINTER(ctypes.c_int),),
    "cuGetErrorName": (CUresult, ctypes.POINTER(ctypes.c_char_p)),
    "cuDeviceGet": (ctypes.POINTER(CUdevice), ctypes.c_int),
    "cuDeviceGetName": (ctypes.c_char_p, ctypes.c_int, CUdevice),
    "cuDeviceGetAttribute": (ctypes.POINTER(ctypes.c_int), ctypes.c_int, CUdevice),
    "cuDevicePrimaryCtxRetain": (ctypes.POINTER(CUcontext), CUdevice),
    "cuCtxSetCurrent": (CUcontext,),
    "cuDevicePrimaryCtxRelease_v2": (CUdevice,),
    "cuStreamCreate": (ctypes.POINTER(CUstream), ctypes.c_uint),
    "cuStreamSynchronize": (CUstream,),
    "cuStreamDestroy_v2": (CUstream,),
    "cuMemAlloc_v2": (ctypes.POINTER(CUdeviceptr), ctypes.c_size_t),
    "cuMemFree_v2": (CUdeviceptr,),
    "cuMemAllocHost_v2": (ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t),
    "cuMemFreeHost": (ctypes.c_void_p,),
    "cuMemcpyHtoDAsync_v2": (CUdeviceptr, ctypes.c_void_p, ctypes.c_size_t, CUstream),
    "cuMemcpyDtoHAsync_v2": (ctypes.c_void_p, CUdeviceptr, ctypes.c_size_t, CUstream),
}


class CudaDriver:
    """``libcuda`` with typed prototypes; each method raises ContractError naming the failed call."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        for name, argtypes in SIGNATURES.items():
            try:
                function = getattr(lib, name)
            except AttributeError as exc:
                raise ContractError(f"the CUDA driver library has no {name}; update the NVIDIA driver") from exc
            function.argtypes = list(argtypes)
            function.restype = CUresult

    def check(self, result: int, what: str) -> None:
        """Raise ContractError unless ``result`` is CUDA_SUCCESS (0)."""
        if result != 0:
            raise ContractError(f"CUDA driver call {what} failed with {self.error_name(result)} ({result})")

    def error_name(self, result: int) -> str:
        name = ctypes.c_char_p()
        if self.lib.cuGetErrorName(result, ctypes.pointer(name)) == 0 and name.value:
            return name.value.decode("ascii", "replace")
        return "an unknown CUresult"

    def init(self) -> None:
        self.check(self.lib.cuInit(0), "cuInit")

    def version(self) -> str:
        """The CUDA version the driver supports, ``"major.minor"`` (``12040`` -> ``"12.4"``)."""
        number = ctypes.c_int()
        self.check(self.lib.cuDriverGetVersion(ctypes.pointer(number)), "cuDriverGetVersion")
        return f"{number.value // 1000}.{number.value % 1000 // 10}"

    def device_count(self) -> int:
        count = ctypes.c_int()
        self.check(self.lib.cuDeviceGetCount(ctypes.pointer(count)), "cuDeviceGetCount")
        return int(count.value)

    def device(self, index: int) -> int:
        handle = CUdevice()
        self.check(self.lib.cuDeviceGet(ctypes.pointer(handle), index), f"cuDeviceGet({index})")
        return int(handle.value)

    def device_name(self, device: int) -> str:
        name = ctypes.create_string_buffer(256)
        self.check(self.lib.cuDeviceGetName(name, len(name), device), "cuDeviceGetName")
        return name.value.decode("utf-8", "replace")

    def compute_capability(self, device: int) -> str:
        """``"major.minor"``, e.g. ``"8.7"`` on Orin."""
        numbers = []
        for attribute in (COMPUTE_CAPABILITY_MAJOR, COMPUTE_CAPABILITY_MINOR):
            value = ctypes.c_int()
            self.check(self.lib.cuDeviceGetAttribute(ctypes.pointer(value), attribute, device), "cuDeviceGetAttribute")
            numbers.append(str(value.value))
        return ".".join(numbers)

    def retain_primary_context(self, device: int) -> int:
        """The device's primary context: the one the CUDA runtime (and so TensorRT) uses."""
        context = CUcontext()
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.pointer(context), device), "cuDevicePrimaryCtxRetain")
        return int(context.value or 0)

    def release_primary_context(self, device: int) -> None:
        """Drop this process's hold on the device's primary context (one call per retain)."""
        self.check(self.lib.cuDevicePrimaryCtxRelease_v2(device), "cuDevicePrimaryCtxRelease")

    def set_current(self, context: int) -> None:
        self.check(self.lib.cuCtxSetCurrent(context), "cuCtxSetCurrent")

    def create_stream(self) -> int:
        stream = CUstream()
        self.check(self.lib.cuStreamCreate(ctypes.pointer(stream), 0), "cuStreamCreate")
        return int(stream.value or 0)

    def destroy_stream(self, stream: int) -> None:
        self.check(self.lib.cuStreamDestroy_v2(stream), "cuStreamDestroy")

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def alloc(self, nbytes: int) -> int:
        pointer = CUdeviceptr()
        self.check(self.lib.cuMemAlloc_v2(ctypes.pointer(pointer), max(nbytes, 1)), f"cuMemAlloc({nbytes} bytes)")
        return int(pointer.value)

    def free(self, pointer: int) -> None:
        self.check(self.lib.cuMemFree_v2(pointer), "cuMemFree")

    def alloc_host(self, nbytes: int) -> int:
        """Page-locked host memory: asynchronous copies from and to it overlap, from pageable memory they do not."""
        pointer = ctypes.c_void_p()
        self.check(self.lib.cuMemAllocHost_v2(ctypes.pointer(pointer), max(nbytes, 1)), f"cuMemAllocHost({nbytes} bytes)")
        return int(pointer.value or 0)

    def free_host(self, pointer: int) -> None:
        self.check(self.lib.cuMemFreeHost(pointer), "cuMemFreeHost")

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int) -> None:
        """Queue a copy of the C-contiguous ``array`` on ``stream`` (keep it alive until the stream syncs)."""
        self.check(self.lib.cuMemcpyHtoDAsync_v2(pointer, array.ctypes.data, array.nbytes, stream), "cuMemcpyHtoDAsync")

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int) -> None:
        """Queue a copy into the C-contiguous, writable ``array`` on ``stream``."""
        self.check(self.lib.cuMemcpyDtoHAsync_v2(array.ctypes.data, pointer, array.nbytes, stream), "cuMemcpyDtoHAsync")


def host_array(pointer: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A numpy array over host memory at ``pointer`` (e.g. from :meth:`CudaDriver.alloc_host`); it
    does not own the memory, which must outlive it."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (ctypes.c_uint8 * nbytes).from_address(pointer)
    return np.frombuffer(memoryview(raw), dtype=dtype).reshape(shape)


@functools.cache
def load_driver() -> CudaDriver:
    """The process's CUDA driver (``libcuda``), initialised; ContractError where there is none."""
    library = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(library)
    except OSError as exc:
        raise ContractError(f"no CUDA driver found ({library}: {exc}); TensorRT engines need an NVIDIA GPU") from exc
    driver = CudaDriver(lib)
    driver.init()
    return driver
