"""Backends: onnxruntime provider order and reporting; native TensorRT engines and the CUDA EP on GPUs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from compir.errors import ContractError
from compir.runtime.backends.ort import DEFAULT_PROVIDERS, resolve_providers
from compir.runtime.encoder import Encoder
from compir.runtime.retriever import Retriever


def test_provider_order_keeps_only_available_ones() -> None:
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    assert resolve_providers(None) == [p for p in DEFAULT_PROVIDERS if p in available]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["tensorrt", "cuda", "cpu"])[-1] == "CPUExecutionProvider"
    with pytest.raises(ContractError, match="none of the providers"):
        resolve_providers(["NoSuchExecutionProvider"])


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


def test_bulk_encoder_turns_off_busy_waiting_and_computes_the_same(tiny_export: Path) -> None:
    size = 2 * [Encoder.from_export(tiny_export, providers=["cpu"]).manifest.preprocess.image_size]
    images = np.random.default_rng(1).normal(size=(3, 3, *size)).astype(np.float32)
    outputs = {}
    for spinning in (True, False):
        encoder = Encoder.from_export(tiny_export, providers=["cpu"], spinning=spinning)
        outputs[spinning] = encoder.encode_pixels(images).image_embeds
        if not spinning:  # what onnxruntime itself reports for the opened session
            session = encoder.backend._sessions["image_encoder"]._session  # type: ignore[attr-defined]
            assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    np.testing.assert_array_equal(outputs[True], outputs[False])


def _ort_hits(tiny_export: Path, tiny_index: Path) -> list[list[str]]:
    retriever = Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])
    ids = retriever.item_ids()[:5]
    return [[h.item_id for h in retriever.search(reference=item, text="make it red", k=5)] for item in ids]


@pytest.mark.gpu
def test_cuda_execution_provider_matches_cpu(tiny_export: Path, tiny_index: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here (install onnxruntime-gpu on a GPU machine)")
    gpu = Retriever.from_dirs(tiny_export, tiny_index, providers=["cuda", "cpu"])
    assert gpu.backend_info["providers"]["image_encoder"][0] == "CUDAExecutionProvider"
    ids = gpu.item_ids()[:5]
    hits = [[h.item_id for h in gpu.search(reference=item, text="make it red", k=5)] for item in ids]
    assert [h[:3] for h in hits] == [h[:3] for h in _ort_hits(tiny_export, tiny_index)]


@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime(tiny_export: Path, tiny_index: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU machines only)")
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
    assert retriever.search(reference=item, text="make it red", k=3)


# The native TensorRT session's own logic (batching, buffers, addresses) on a stand-in engine and
# driver: the real ones need a GPU (test_tensorrt_engines_match_onnxruntime above).


def test_batch_plan_chunks_to_the_profile_and_pads_short_batches() -> None:
    from compir.runtime.backends.tensorrt import batch_plan

    assert batch_plan(9, min_batch=2, max_batch=4) == [(0, 4, 4), (4, 8, 4), (8, 9, 2)]
    assert batch_plan(3, min_batch=1, max_batch=64) == [(0, 3, 3)]
    assert batch_plan(1, min_batch=8, max_batch=8) == [(0, 1, 8)]
    assert batch_plan(0, min_batch=1, max_batch=8) == []


class _FakeDriver:
    """Device memory as a dict keyed by 64-bit addresses; copies are immediate."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.freed: list[int] = []
        self._next = 0x7F00_0000_0000

    def alloc(self, nbytes: int) -> int:
        self._next += 1 << 20
        self.memory[self._next] = np.zeros(max(nbytes, 1), dtype=np.uint8)
        return self._next

    def free(self, pointer: int) -> None:
        del self.memory[pointer]
        self.freed.append(pointer)

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int) -> None:
        self.memory[pointer][: array.nbytes] = np.frombuffer(array.tobytes(), dtype=np.uint8)

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int) -> None:
        array.reshape(-1).view(np.uint8)[:] = self.memory[pointer][: array.nbytes]

    def synchronize(self, stream: int) -> None:
        pass


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


def test_tensorrt_session_chunks_pads_and_frees(monkeypatch: pytest.MonkeyPatch) -> None:
    session, driver, context = _fake_session(monkeypatch, batch_range=(2, 4))
    x = np.arange(9 * 4, dtype=np.float64).reshape(9, 4)  # float64 in: cast to the engine's float32
    y = session.run({"x": x})["y"]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(y, 2 * x[:, :2].astype(np.float32))
    assert y.dtype == np.float32 and context.batches == [4, 4, 2]  # the last row padded to min_batch
    assert not driver.memory and len(driver.freed) == 6  # every buffer of every call freed
    assert session.run({"x": np.zeros((0, 4), np.float32)})["y"].shape == (0, 2)  # type: ignore[attr-defined]


def test_tensorrt_session_reports_refused_shapes_and_frees(monkeypatch: pytest.MonkeyPatch) -> None:
    session, driver, context = _fake_session(monkeypatch, batch_range=(1, 8))
    context.max_batch = 2  # an engine whose real profile is narrower than engines.json says
    with pytest.raises(ContractError, match=r"composer engine refuses input 'x' of shape \(3, 4\)"):
        session.run({"x": np.zeros((3, 4), np.float32)})  # type: ignore[attr-defined]
    assert not driver.memory
    with pytest.raises(ContractError, match=r"no output\(s\) \['z'\]"):
        session.run({"x": np.zeros((1, 4), np.float32)}, ["z"])  # type: ignore[attr-defined]
