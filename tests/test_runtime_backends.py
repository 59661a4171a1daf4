"""Backends: onnxruntime provider order and reporting; native TensorRT engines and the CUDA EP on GPUs."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from compir.errors import ContractError
from compir.runtime.backends.ort import DEFAULT_PROVIDERS, resolve_providers
from compir.runtime.encoder import Encoder
from compir.runtime.retriever import Retriever
from tests.fixtures.export import UNSET_SPINS, allow_spinning
from tests.gpu import require_cuda_device, require_tensorrt_gpu


def test_provider_order_keeps_only_available_ones() -> None:
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    assert DEFAULT_PROVIDERS == ("CUDAExecutionProvider", "CPUExecutionProvider")  # never TensorRT unless asked for
    assert resolve_providers(None) == [p for p in DEFAULT_PROVIDERS if p in available]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["tensorrt", "cuda", "cpu"])[-1] == "CPUExecutionProvider"
    with pytest.raises(ContractError, match="none of the providers"):
        resolve_providers(["NoSuchExecutionProvider"])


def test_tensorrt_provider_options_come_from_the_manifest(tiny_export: Path, tmp_path: Path) -> None:
    from compir.manifest import load_manifest
    from compir.runtime.backends.providers import TensorRTProviderSettings, session_providers, tensorrt_options

    manifest = load_manifest(tiny_export)
    size = manifest.preprocess.image_size
    settings = TensorRTProviderSettings(cache_dir=tmp_path / "cache", batches=(1, 8, 32))
    options = tensorrt_options(manifest.graph("image_encoder"), settings)
    assert options == {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path / "cache"),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(tmp_path / "cache"),
        "trt_fp16_enable": "True",
        "trt_profile_min_shapes": f"pixel_values:1x3x{size}x{size}",
        "trt_profile_opt_shapes": f"pixel_values:8x3x{size}x{size}",
        "trt_profile_max_shapes": f"pixel_values:32x3x{size}x{size}",
    }
    context = manifest.tokenizer.context_length
    tokens = (1, 12, context)  # texts run cut after the longest (1 to context tokens)
    query = tensorrt_options(manifest.graph("query_encoder"), TensorRTProviderSettings(cache_dir=tmp_path, fp16=False, tokens=tokens))
    assert query["trt_fp16_enable"] == "False"
    assert query["trt_profile_max_shapes"] == f"pixel_values:64x3x{size}x{size},input_ids:64x{context}"  # every input
    assert query["trt_profile_opt_shapes"] == f"pixel_values:8x3x{size}x{size},input_ids:8x12"
    entries = session_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                                manifest.graph("text_encoder"), tensorrt=replace(settings, tokens=tokens))
    assert entries[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert entries[0][0] == "TensorrtExecutionProvider" and entries[0][1]["trt_profile_min_shapes"] == "input_ids:1x1"
    with pytest.raises(ContractError, match="axis 1 is dynamic \\('sequence'\\)"):  # the token range is needed
        tensorrt_options(manifest.graph("text_encoder"), settings)
    with pytest.raises(ContractError, match=r"1 <= min \(8\) <= opt \(1\)"):
        tensorrt_options(manifest.graph("image_encoder"), TensorRTProviderSettings(cache_dir=tmp_path, batches=(8, 1, 64)))


def test_fallback_past_a_gpu_provider_is_named() -> None:
    from compir.runtime.backends.providers import fallback_message, missing_providers

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert missing_providers(gpu, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["TensorrtExecutionProvider"]
    assert missing_providers(gpu, gpu) == [] and missing_providers(["CPUExecutionProvider"], ["CPUExecutionProvider"]) == []
    message = fallback_message("image_encoder", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])
    assert message.startswith("onnxruntime runs the image_encoder graph on the CPU: CUDAExecutionProvider did not load")


def test_tensorrt_cache_lives_in_the_export_or_the_user_cache(tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from compir.manifest import manifest_sha256
    from compir.runtime.backends.providers import tensorrt_cache_dir

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    assert tensorrt_cache_dir(export, versions="ort-1-trt-10") == export / "onnxruntime-tensorrt-cache" / "ort-1-trt-10"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only export folder (root ignores chmod)
    user = tensorrt_cache_dir(export, versions="ort-1-trt-10")
    assert user == tmp_path / "user-cache" / "compir" / "onnxruntime-tensorrt" / manifest_sha256(export)[:16] / "ort-1-trt-10"


def test_cpu_sessions_report_what_loaded_and_no_fallback(tiny_export: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning where no GPU provider was asked for
        encoder = Encoder.from_export(tiny_export, providers=["cpu"])
    info = encoder.backend_info()
    assert info["providers"]["image_encoder"] == ["CPUExecutionProvider"]
    assert info["missing_providers"]["image_encoder"] == []


def test_variants_agree_and_report_what_they_run_on(tiny_export: Path) -> None:
    reference = Encoder.from_export(tiny_export, providers=["cpu"])
    variants = sorted(reference.manifest.variants)
    size = reference.manifest.preprocess.image_size
    images = np.random.default_rng(0).normal(size=(4, 3, size, size)).astype(np.float32)
    base = reference.encode_pixels(images).image_embeds
    for variant in variants:
        encoder = Encoder.from_export(tiny_export, providers=["cpu"], variant=variant)
        info = encoder.backend_info()
        assert info["variant"] == variant and info["providers"]["image_encoder"] == ["CPUExecutionProvider"]
        embeds = encoder.encode_pixels(images).image_embeds
        cosine = (embeds * base).sum(axis=1)
        assert embeds.dtype == np.float32 and cosine.min() > 0.9, (variant, cosine)
    with pytest.raises(ContractError, match="no 'fp64' variant"):
        Encoder.from_export(tiny_export, variant="fp64")


def test_idle_pool_threads_sleep_by_default_and_compute_the_same_spinning(tiny_export: Path) -> None:
    size = 2 * [Encoder.from_export(tiny_export, providers=["cpu"]).manifest.preprocess.image_size]
    images = np.random.default_rng(1).normal(size=(3, 3, *size)).astype(np.float32)
    outputs = {}
    for spinning in (True, None):  # None: the default
        encoder = Encoder.from_export(tiny_export, providers=["cpu"], **({} if spinning is None else {"spinning": spinning}))
        outputs[spinning] = encoder.encode_pixels(images).image_embeds
        sessions = encoder.backend._sessions  # type: ignore[attr-defined]
        assert len(sessions) >= 2, sorted(sessions)
        for session in sessions.values():  # what onnxruntime itself reports for each opened graph
            assert allow_spinning(session._session) == (UNSET_SPINS if spinning else "0")
    np.testing.assert_array_equal(outputs[True], outputs[None])


def _ort_hits(tiny_export: Path, tiny_index: Path) -> list[list[str]]:
    retriever = Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])
    ids = retriever.item_ids()[:5]
    return [[h.item_id for h in retriever.search(reference_id=item, text="make it red", k=5)] for item in ids]


@pytest.mark.gpu
def test_cuda_execution_provider_matches_cpu(tiny_export: Path, tiny_index: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here (install onnxruntime-gpu on a GPU machine)")
    require_cuda_device()
    gpu = Retriever.from_dirs(tiny_export, tiny_index, providers=None)  # the default: CUDA, then CPU
    assert gpu.backend_info["providers"]["image_encoder"][0] == "CUDAExecutionProvider"
    ids = gpu.item_ids()[:5]
    hits = [[h.item_id for h in gpu.search(reference_id=item, text="make it red", k=5)] for item in ids]
    assert [h[:3] for h in hits] == [h[:3] for h in _ort_hits(tiny_export, tiny_index)]


@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime(tiny_export: Path, tiny_index: Path, tmp_path: Path) -> None:
    require_tensorrt_gpu()
    from compir.export.cli import main as export_main

    export_dir = tmp_path / "export"
    shutil.copytree(tiny_export, export_dir)
    assert export_main(["engine", str(export_dir), "--precision", "fp32", "--max-batch", "16"]) == 0
    index_dir = tmp_path / "index"
    shutil.copytree(tiny_index, index_dir)
    ort = Encoder.from_export(export_dir, providers=["cpu"])
    trt = Encoder.from_export(export_dir, backend="tensorrt")
    assert trt.backend_info()["backend"] == "tensorrt"
    size = ort.manifest.preprocess.image_size
    pixels = np.random.default_rng(1).normal(size=(3, 3, size, size)).astype(np.float32)
    np.testing.assert_allclose(trt.encode_pixels(pixels).image_embeds, ort.encode_pixels(pixels).image_embeds, atol=2e-3)
    ids = ort.tokenize(["make it red", "a blue square"])
    np.testing.assert_allclose(trt.encode_input_ids(ids).text_embeds, ort.encode_input_ids(ids).text_embeds, atol=2e-3)
    retriever = Retriever(trt, Retriever.from_dirs(export_dir, index_dir, providers=["cpu"]).gallery)
    item = retriever.item_ids()[0]
    assert retriever.search(reference_id=item, text="make it red", k=3)
    trt.backend.close()  # type: ignore[attr-defined]  # frees the pools, destroys the stream, releases the context
    trt.backend.close()  # type: ignore[attr-defined]  # twice is harmless


@pytest.mark.gpu
def test_onnxruntime_tensorrt_provider_loads_with_caches(tiny_export: Path, tmp_path: Path) -> None:
    import onnxruntime

    require_tensorrt_gpu()
    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT execution provider (install onnxruntime-gpu)")
    export_dir = tmp_path / "export"
    shutil.copytree(tiny_export, export_dir)
    trt = Encoder.from_export(export_dir, providers=["tensorrt", "cuda", "cpu"])
    info = trt.backend_info()
    assert info["providers"]["image_encoder"][0] == "TensorrtExecutionProvider", info  # type: ignore[index]
    size = trt.manifest.preprocess.image_size
    pixels = np.random.default_rng(2).normal(size=(3, 3, size, size)).astype(np.float32)
    reference = Encoder.from_export(export_dir, providers=["cpu"]).encode_pixels(pixels).image_embeds
    cosine = (trt.encode_pixels(pixels).image_embeds * reference).sum(axis=1)
    assert cosine.min() > 0.999  # fp16 engines
    assert list((export_dir / "onnxruntime-tensorrt-cache").rglob("*.engine")), "no engine cached"


# The native TensorRT session's own logic (batching, buffers, addresses) on a stand-in engine and
# driver: the real ones need a GPU (test_tensorrt_engines_match_onnxruntime above).


def test_batch_plan_chunks_to_the_profile_and_pads_short_batches() -> None:
    from compir.runtime.backends.tensorrt import batch_plan

    assert batch_plan(9, min_batch=2, max_batch=4) == [(0, 4, 4), (4, 8, 4), (8, 9, 2)]
    assert batch_plan(3, min_batch=1, max_batch=64) == [(0, 3, 3)]
    assert batch_plan(1, min_batch=8, max_batch=8) == [(0, 1, 8)]
    assert batch_plan(0, min_batch=1, max_batch=8) == []


class _FakeDriver:
    """Device memory as a dict keyed by 64-bit addresses, host memory as numpy buffers; copies are immediate."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.host: dict[int, np.ndarray] = {}
        self.allocs = 0
        self.freed: list[int] = []
        self.synced = 0
        self._next = 0x7F00_0000_0000

    def alloc(self, nbytes: int) -> int:
        self.allocs += 1
        self._next += 1 << 20
        self.memory[self._next] = np.zeros(max(nbytes, 1), dtype=np.uint8)
        return self._next

    def free(self, pointer: int) -> None:
        del self.memory[pointer]
        self.freed.append(pointer)

    def alloc_host(self, nbytes: int) -> int:
        buffer = np.zeros(max(nbytes, 1), dtype=np.uint8)
        self.host[buffer.ctypes.data] = buffer
        return int(buffer.ctypes.data)

    def free_host(self, pointer: int) -> None:
        del self.host[pointer]

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int) -> None:
        self.memory[pointer][: array.nbytes] = np.frombuffer(array.tobytes(), dtype=np.uint8)

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int) -> None:
        array.reshape(-1).view(np.uint8)[:] = self.memory[pointer][: array.nbytes]

    def synchronize(self, stream: int) -> None:
        self.synced += 1


class _FakeContext:
    """y = 2 * x[:, :2] for batches within the profile, reading and writing fake device memory."""

    def __init__(self, driver: _FakeDriver, max_batch: int) -> None:
        self.driver, self.max_batch = driver, max_batch
        self.shape: tuple[int, ...] = (-1, 4)
        self.addresses: dict[str, int] = {}
        self.batches: list[int] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if not 1 <= shape[0] <= self.max_batch:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.shape[0], 2)

    def set_tensor_address(self, name: str, pointer: int) -> None:
        self.addresses[name] = pointer

    def execute_async_v3(self, stream: int) -> bool:
        rows = self.shape[0]
        x = self.driver.memory[self.addresses["x"]][: rows * 16].view(np.float32).reshape(rows, 4)
        y = (2 * x[:, :2]).astype(np.float32)
        self.driver.memory[self.addresses["y"]][: y.nbytes] = np.frombuffer(y.tobytes(), dtype=np.uint8)
        self.batches.append(rows)
        return True


class _FakeEngine:
    def __init__(self, context: _FakeContext) -> None:
        self.context = context
        self.num_io_tensors = 2

    def get_tensor_name(self, index: int) -> str:
        return ("x", "y")[index]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == "x" else "output"

    def get_tensor_dtype(self, name: str) -> type:
        return np.float32

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1, 4) if name == "x" else (-1, 2)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, 4), (2, 4), (8, 4)]  # (min, opt, max) of an input; the session takes its batch from engines.json

    def create_execution_context(self) -> _FakeContext:
        return self.context


def _fake_session(monkeypatch: pytest.MonkeyPatch, *, batch_range: tuple[int, int]) -> tuple[object, _FakeDriver, _FakeContext]:
    import sys
    from types import SimpleNamespace

    from compir.manifest import GraphSpec, TensorSpec
    from compir.runtime.backends.tensorrt import TensorRTSession

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="input"), nptype=lambda dtype: dtype))
    driver = _FakeDriver()
    context = _FakeContext(driver, max_batch=batch_range[1])
    cuda = SimpleNamespace(driver=driver, stream=0x7F00_0000_0042, make_current=lambda: None)
    runtime = SimpleNamespace(deserialize_cuda_engine=lambda plan: _FakeEngine(context))
    spec = GraphSpec(
        role="composer",
        file="fp32/composer.onnx",
        sha256="0" * 64,
        inputs=(TensorSpec(name="x", dtype="float32", shape=("batch", 4)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("batch", 2)),),
    )
    session = TensorRTSession(b"plan", spec, runtime=runtime, cuda=cuda, batch_range=batch_range)  # type: ignore[arg-type]
    return session, driver, context


def test_tensorrt_session_chunks_pads_and_reuses_its_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    session, driver, context = _fake_session(monkeypatch, batch_range=(2, 4))
    assert driver.allocs == 2 and len(driver.host) == 2  # x and y, each on the device and pinned on the host
    assert {driver.memory[p].nbytes for p in driver.memory} == {4 * 4 * 4, 4 * 2 * 4}  # sized for the largest batch (4)
    x = np.arange(9 * 4, dtype=np.float64).reshape(9, 4)  # float64 in: cast to the engine's float32
    y = session.run({"x": x})["y"]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(y, 2 * x[:, :2].astype(np.float32))
    assert y.dtype == np.float32 and context.batches == [4, 4, 2]  # the last row padded to min_batch
    again = session.run({"x": x[:3]})["y"]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(again, 2 * x[:3, :2].astype(np.float32))
    np.testing.assert_array_equal(y, 2 * x[:, :2].astype(np.float32))  # results do not alias the reused buffers
    assert driver.allocs == 2 and not driver.freed  # no cuMemAlloc / cuMemFree per call
    assert session.run({"x": np.zeros((0, 4), np.float32)})["y"].shape == (0, 2)  # type: ignore[attr-defined]
    session.close()  # type: ignore[attr-defined]
    assert not driver.memory and not driver.host and len(driver.freed) == 2
    with pytest.raises(ContractError, match="session is closed"):
        session.run({"x": x})  # type: ignore[attr-defined]


def test_tensorrt_session_reports_refused_shapes_and_keeps_working(monkeypatch: pytest.MonkeyPatch) -> None:
    session, driver, context = _fake_session(monkeypatch, batch_range=(1, 8))
    context.max_batch = 2  # an engine whose real profile is narrower than engines.json says
    synced = driver.synced
    with pytest.raises(ContractError, match=r"composer engine refuses input 'x' of shape \(3, 4\)"):
        session.run({"x": np.zeros((3, 4), np.float32)})  # type: ignore[attr-defined]
    assert driver.synced == synced + 1 and driver.allocs == 2  # the stream is drained, nothing leaked or reallocated
    np.testing.assert_array_equal(session.run({"x": np.ones((2, 4), np.float32)})["y"], np.full((2, 2), 2.0))  # type: ignore[attr-defined]
    with pytest.raises(ContractError, match=r"no output\(s\) \['z'\]"):
        session.run({"x": np.zeros((1, 4), np.float32)}, ["z"])  # type: ignore[attr-defined]


def test_tensorrt_session_refuses_an_engine_narrower_than_its_record(monkeypatch: pytest.MonkeyPatch) -> None:
    original = _FakeContext.__init__

    def narrow(self: _FakeContext, driver: _FakeDriver, max_batch: int) -> None:
        original(self, driver, max_batch=max_batch // 2)

    monkeypatch.setattr(_FakeContext, "__init__", narrow)
    with pytest.raises(ContractError, match=r"refuses input 'x' of shape \(8, 4\) \(its profile's largest\)"):
        _fake_session(monkeypatch, batch_range=(1, 8))
