"""Hub ids without Hub access fail at once, naming the local-folder way; with access nothing is forced offline.

The Hub is played by 127.0.0.1: a closed port (no Hub), a port that accepts and never answers (a
firewall that drops), and a small HTTP server that answers 404 to everything (a Hub that is there).
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("transformers")
from huggingface_hub import constants  # noqa: E402  (transformers' dependency)

from compir.errors import InputError  # noqa: E402
from compir.train import hub  # noqa: E402
from compir.train.text import TextTokenizer, _open_clip_tokenizer  # noqa: E402

SIGLIP_TOKENIZER = "timm/ViT-B-16-SigLIP"  # open_clip's hf_tokenizer_name of ViT-B-16-SigLIP


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    """A clean slate: online mode, an empty Hugging Face cache, no probe remembered; the test sets ENDPOINT.
    The imports a load makes are made here, so that the tests time the load alone."""
    import open_clip.tokenizer  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub.hub_reachable.cache_clear()
    _open_clip_tokenizer.cache_clear()
    yield
    hub.hub_reachable.cache_clear()
    _open_clip_tokenizer.cache_clear()


def _closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def _load_error() -> tuple[str, float]:
    started = time.perf_counter()
    with pytest.raises(InputError) as caught:
        TextTokenizer(context_length=64, hf_name=SIGLIP_TOKENIZER)(["make it red"])
    return str(caught.value), time.perf_counter() - started


@pytest.mark.parametrize("hub_kind", ["refused", "silent"])
def test_an_unreachable_hub_fails_at_once_naming_the_local_folder(endpoint: None, monkeypatch: pytest.MonkeyPatch, hub_kind: str) -> None:
    silent = socket.socket()  # accepts connections (backlog) and never answers: huggingface_hub would wait and retry
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    port = int(silent.getsockname()[1]) if hub_kind == "silent" else _closed_port()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        message, seconds = _load_error()
    finally:
        silent.close()
    assert seconds < 15, f"{seconds:.1f} s"  # f21d587: 51 s against the closed port, > 300 s against the silent one
    assert "cannot be reached" in message and "text_cfg.hf_tokenizer_name" in message and "save_pretrained('DIR')" in message
    assert "\n" not in message
    assert os.environ.get("HF_HUB_OFFLINE") is None and constants.HF_HUB_OFFLINE is False  # offline only during the load


class _NotFound(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_HEAD(self) -> None:  # noqa: N802  (http.server's naming)
        self.paths.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


_LOAD = """
from compir.errors import InputError
from compir.train.text import TextTokenizer
try:
    TextTokenizer(context_length=64, hf_name={name!r})(["make it red"])
except InputError as exc:
    print(exc)
"""


def test_a_reachable_hub_is_asked(endpoint: None, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _NotFound.paths = []
    address = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", address)
    try:
        with hub.hub_access(SIGLIP_TOKENIZER) as online:
            assert online and constants.HF_HUB_OFFLINE is False
        # A fresh interpreter, where HF_ENDPOINT sends every request of huggingface_hub and transformers to the server.
        env = {**os.environ, "HF_ENDPOINT": address, "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
        env.pop("HF_HUB_OFFLINE", None)
        result = subprocess.run([sys.executable, "-c", _LOAD.format(name=SIGLIP_TOKENIZER)], capture_output=True, text=True,
                                env=env, timeout=300, check=False)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "download failed" in result.stdout and "text_cfg.hf_tokenizer_name" in result.stdout, result.stdout
    assert any(SIGLIP_TOKENIZER in path for path in _NotFound.paths), _NotFound.paths  # transformers asked the Hub for its files


def test_hf_hub_offline_is_honoured_without_a_probe(endpoint: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("probed the Hub although offline"))
    assert not hub.hub_reachable()
    with hub.hub_access(SIGLIP_TOKENIZER) as online:
        assert not online


def test_local_paths_are_not_hub_ids(tmp_path) -> None:
    assert hub.is_hub_id("timm/ViT-B-16-SigLIP") and hub.is_hub_id("xlm-roberta-base")
    assert not hub.is_hub_id(str(tmp_path)) and not hub.is_hub_id("/models/missing-tokenizer") and not hub.is_hub_id("./tok")
    assert not hub.is_hub_id("")
