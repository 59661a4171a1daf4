"""engines.json: records round-trip, checksums, binding to the export, device compatibility."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from compir.contracts import ENGINES_FILE, sha256_bytes
from compir.cuda_driver import SIGNATURES, CudaDriver
from compir.engines import (
    DeviceInfo,
    EngineRecord,
    EngineSet,
    ShapeRange,
    check_compatible,
    check_tensorrt_version,
    detect_device,
    load_engines,
    save_engines,
)
from compir.errors import ContractError

ORIN = DeviceInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")
H100 = DeviceInfo(tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
MANIFEST = "m" * 64


def write_engines(folder: Path, *, device: DeviceInfo = ORIN, plans: dict[str, bytes] | None = None) -> EngineSet:
    plans = plans or {"image_encoder": b"image plan bytes", "text_encoder": b"text plan bytes"}
    records = {}
    for role, plan in plans.items():
        (folder / f"{role}.plan").write_bytes(plan)
        records[role] = EngineRecord(
            role=role,
            file=f"{role}.plan",
            sha256=sha256_bytes(plan),
            onnx_file=f"fp32/{role}.onnx",
            onnx_sha256="o" * 64,
            precision="fp16",
            profile={"pixel_values": ShapeRange(min=(1, 3, 64, 64), opt=(8, 3, 64, 64), max=(64, 3, 64, 64))},
            device=device,
            build_seconds=12.5,
        )
    engines = EngineSet(manifest_sha256=MANIFEST, variant="fp32", precision="fp16", engines=records)
    save_engines(folder, engines)
    return engines


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    written = write_engines(tmp_path)
    loaded = load_engines(tmp_path, manifest_sha256=MANIFEST, device=ORIN)
    assert loaded == written
    raw = json.loads((tmp_path / ENGINES_FILE).read_text())
    assert raw["format"] == "compir.engines" and raw["schema_version"] == 1
    assert raw["engines"]["image_encoder"]["profile"]["pixel_values"]["opt"] == [8, 3, 64, 64]
    assert loaded.engine("text_encoder").device.compute_capability == "8.7"


def test_damaged_plan_is_refused(tmp_path: Path) -> None:
    write_engines(tmp_path)
    (tmp_path / "text_encoder.plan").write_bytes(b"text plan bytez")
    with pytest.raises(ContractError, match="text_encoder.*damaged"):
        load_engines(tmp_path)


def test_engines_of_another_export_are_refused(tmp_path: Path) -> None:
    write_engines(tmp_path)
    with pytest.raises(ContractError, match="different export.*compir export engine"):
        load_engines(tmp_path, manifest_sha256="x" * 64)


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (replace(ORIN, tensorrt_version="10.7.0"), r"TensorRT 10\.3\.0 \(this device has 10\.7\.0\)"),
        (H100, r"compute capability 8\.7 on 'Orin' \(this device: 9\.0"),
    ],
)
def test_engine_from_another_device_says_rebuild_here(tmp_path: Path, current: DeviceInfo, expected: str) -> None:
    write_engines(tmp_path, device=ORIN)
    with pytest.raises(ContractError, match=expected) as caught:
        load_engines(tmp_path, device=current)
    message = str(caught.value)
    assert "rebuild it on this device" in message and "--precision fp16" in message and "Jetson" in message


def test_same_architecture_under_another_name_is_compatible(tmp_path: Path) -> None:
    engines = write_engines(tmp_path, device=ORIN)
    check_compatible(engines.engine("image_encoder"), device=replace(ORIN, gpu_name="Jetson AGX Orin 64GB"))


def test_missing_role_and_malformed_records(tmp_path: Path) -> None:
    engines = write_engines(tmp_path)
    with pytest.raises(ContractError, match="no TensorRT engine for graph 'composer'"):
        engines.engine("composer")
    raw = json.loads((tmp_path / ENGINES_FILE).read_text())
    raw["engines"]["image_encoder"]["precision"] = "int4"
    (tmp_path / ENGINES_FILE).write_text(json.dumps(raw))
    with pytest.raises(ContractError, match="unknown precision 'int4'"):
        load_engines(tmp_path)
    del raw["engines"]["image_encoder"]["device"]
    (tmp_path / ENGINES_FILE).write_text(json.dumps(raw))
    with pytest.raises(ContractError, match="missing field.*device"):
        load_engines(tmp_path)
    raw["format"] = "compir.index"
    (tmp_path / ENGINES_FILE).write_text(json.dumps(raw))
    with pytest.raises(ContractError, match="expected 'compir.engines'"):
        load_engines(tmp_path)


def test_missing_engines_file(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="engines.json is missing"):
        load_engines(tmp_path)


def test_shape_range_validation() -> None:
    with pytest.raises(ContractError, match="min <= opt <= max"):
        ShapeRange(min=(8, 3), opt=(4, 3), max=(16, 3))
    with pytest.raises(ContractError, match="rank"):
        ShapeRange(min=(1, 3), opt=(4, 3), max=(16,))


def test_detect_device_without_tensorrt_is_a_clear_error() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ContractError, match="TensorRT is not installed"):
            detect_device()
    else:
        pytest.skip("TensorRT is installed here: covered by the GPU build test")


class _Symbol:
    """One fake C function: callable, with the ``argtypes``/``restype`` ctypes functions carry."""

    def __init__(self, body: Callable[..., int]) -> None:
        self.body = body
        self.argtypes: list[object] | None = None
        self.restype: object = None

    def __call__(self, *args: object) -> int:
        return self.body(*args)


class _FakeDriverLib:
    """Stands in for libcuda: records calls, hands out device pointers above 4 GiB."""

    NAMES = {0: b"CUDA_SUCCESS", 2: b"CUDA_ERROR_OUT_OF_MEMORY"}

    def __init__(self, *, alloc_result: int = 0) -> None:
        self.freed: list[int] = []
        for name in SIGNATURES:
            setattr(self, name, _Symbol(lambda *args: 0))
        self.cuGetErrorName = _Symbol(self._error_name)
        self.cuMemAlloc_v2 = _Symbol(lambda out, size: self._alloc(out, alloc_result))
        self.cuMemFree_v2 = _Symbol(lambda pointer: self.freed.append(pointer) or 0)

    def _error_name(self, code: int, out: Any) -> int:
        if code not in self.NAMES:
            return 1  # CUDA_ERROR_INVALID_VALUE
        out.contents.value = self.NAMES[code]
        return 0

    @staticmethod
    def _alloc(out: Any, result: int) -> int:
        out.contents.value = 0x7F12_3456_7000  # needs all 64 bits
        return result


def test_cuda_driver_declares_every_prototype_with_64_bit_device_pointers() -> None:
    import ctypes

    lib = _FakeDriverLib()
    driver = CudaDriver(lib)
    for name, argtypes in SIGNATURES.items():
        function = getattr(lib, name)
        assert function.restype is ctypes.c_int and function.argtypes == list(argtypes), name
    assert lib.cuMemAlloc_v2.argtypes[0] == ctypes.POINTER(ctypes.c_uint64)
    assert lib.cuMemFree_v2.argtypes == [ctypes.c_uint64]
    assert lib.cuMemcpyHtoDAsync_v2.argtypes[0] is ctypes.c_uint64 and lib.cuMemcpyDtoHAsync_v2.argtypes[1] is ctypes.c_uint64
    pointer = driver.alloc(1024)
    assert pointer == 0x7F12_3456_7000
    driver.free(pointer)
    assert lib.freed == [pointer]


def test_cuda_driver_errors_are_reported_by_name() -> None:
    driver = CudaDriver(_FakeDriverLib(alloc_result=2))
    with pytest.raises(ContractError, match=r"cuMemAlloc\(64 bytes\) failed with CUDA_ERROR_OUT_OF_MEMORY \(2\)"):
        driver.alloc(64)
    with pytest.raises(ContractError, match=r"cuStreamSynchronize failed with an unknown CUresult \(999\)"):
        driver.check(999, "cuStreamSynchronize")


def test_cuda_driver_without_a_symbol_is_a_clear_error() -> None:
    lib = _FakeDriverLib()
    del lib.cuStreamCreate
    with pytest.raises(ContractError, match="has no cuStreamCreate"):
        CudaDriver(lib)


@pytest.mark.parametrize("version", ["10.0.1", "10.3.0", "10.3.0.30", "10.16.1.11"])
def test_tensorrt_10_is_supported(version: str) -> None:
    check_tensorrt_version(version)


@pytest.mark.parametrize("version", ["8.6.2.3", "8.5.2.2", "9.3.0.1", "7.1.3"])
def test_tensorrt_before_10_is_refused_naming_the_jetpack_to_use(version: str) -> None:
    with pytest.raises(ContractError) as refused:
        check_tensorrt_version(version)
    message = str(refused.value)
    assert f"TensorRT {version} is too old" in message and "int64 token ids" in message
    assert "JetPack 6.0 ships TensorRT 8.6" in message and "flash JetPack 6.1 or 6.2 (TensorRT 10.3)" in message


@pytest.mark.parametrize("version", ["11.0.0.114", "11.4.0.106", "12.0"])
def test_tensorrt_11_and_later_are_refused_with_the_pin(version: str) -> None:
    expected = rf"TensorRT {re.escape(version)} is not supported: TensorRT 11 removed .*tensorrt-cu12 >= 10, < 11"
    with pytest.raises(ContractError, match=expected):
        check_tensorrt_version(version)


def test_unreadable_tensorrt_version_is_refused() -> None:
    with pytest.raises(ContractError, match="cannot read the TensorRT version 'abc'"):
        check_tensorrt_version("abc")


def test_cuda_driver_reports_its_cuda_version_and_device_count() -> None:
    lib = _FakeDriverLib()

    def version(out: Any) -> int:
        out.contents.value = 12040  # CUDA 12.4, as cuda.h encodes it (1000 * major + 10 * minor)
        return 0

    def count(out: Any) -> int:
        out.contents.value = 2
        return 0

    lib.cuDriverGetVersion = _Symbol(version)
    lib.cuDeviceGetCount = _Symbol(count)
    driver = CudaDriver(lib)
    assert (driver.version(), driver.device_count()) == ("12.4", 2)
