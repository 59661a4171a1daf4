"""How `compir serve` turns its options into a ServiceConfig (limits, batching, API key)."""

from __future__ import annotations

import pytest

from compir.service.cli import build_parser, config_from_args
from compir.service.config import Limits, resolve_batching

CPU = {"backend": "onnxruntime", "providers": {"image_encoder": ["CPUExecutionProvider"]}}
CUDA = {"backend": "onnxruntime", "providers": {"image_encoder": ["CUDAExecutionProvider", "CPUExecutionProvider"]}}


@pytest.mark.parametrize(
    ("mode", "info", "enabled", "reason"),
    [
        ("auto", CPU, False, "CPU"),
        ("auto", CUDA, True, "GPU"),
        ("auto", {"backend": "tensorrt", "providers": {}}, True, "GPU"),
        ("on", CPU, True, "--batching on"),
        ("off", CUDA, False, "--batching off"),
    ],
)
def test_batching_is_resolved_from_the_mode_and_the_backend(mode, info, enabled, reason):
    batching = resolve_batching(mode, backend_info=info, max_batch=8, wait_ms=3.0)
    assert batching.enabled is enabled and reason in batching.reason
    assert (batching.max_batch, batching.wait_ms) == (8, 3.0)


def test_options_become_the_config_and_the_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("COMPIR_API_KEY", "from-env")
    args = build_parser().parse_args(["e", "i", "--max-k", "7", "--max-upload-bytes", "1000", "--batching", "on"])
    config = config_from_args(args, backend_info=CPU)
    assert config.limits == Limits(max_k=7, max_upload_bytes=1000)
    assert config.batching.enabled and config.api_key == "from-env"
    assert "from-env" not in str(config.describe())
    assert args.host == "127.0.0.1"  # loopback unless asked
    explicit = config_from_args(build_parser().parse_args(["e", "i", "--api-key", "k2"]), backend_info=CPU)
    assert explicit.api_key == "k2" and not explicit.batching.enabled


def test_bad_batching_mode_is_refused():
    with pytest.raises(ValueError, match="auto, on or off"):
        resolve_batching("sometimes", backend_info=CPU, max_batch=8, wait_ms=2.0)
