"""Gallery writes under a real ``compir serve``: an add is acknowledged once its own write is on
disk (group commit: one save carries every write queued behind the save in progress), acknowledged
adds survive kill -9, and a busy port is one line and exit status 2 before the model loads."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from compir.runtime.retriever import Retriever
from compir.service.app import create_app
from compir.service.config import BatchingConfig, ServiceConfig
from compir.service.engine import ServiceEngine
from compir.service.server import BackgroundServer
from tests.fixtures.service import add_until_killed, free_port, png_bytes, start_serve


def test_concurrent_adds_share_saves_and_each_is_on_disk_when_acknowledged(tiny_export, tiny_index, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(tiny_index, index)
    retriever = Retriever.from_dirs(tiny_export, index, providers=["cpu"])
    engine = ServiceEngine(retriever, config=ServiceConfig(batching=BatchingConfig(enabled=False)))
    adders = 12
    start = threading.Barrier(adders)

    def add(n: int) -> tuple[str, int]:
        start.wait()
        response = httpx.post(server.url + "/gallery/items", files=[("files", (f"g{n}.png", png_bytes((32 + n, 32)), "image/png"))],
                              timeout=120)
        assert response.status_code == 200, response.text
        assert f"g{n}" in _ids_on_disk(index), f"g{n} acknowledged but not on disk"
        return response.json()["added"][0], response.json()["count"]

    with BackgroundServer(create_app(engine)) as server, ThreadPoolExecutor(adders) as pool:
        results = list(pool.map(add, range(adders)))
    assert sorted(item for item, _ in results) == sorted(f"g{n}" for n in range(adders))
    assert max(count for _, count in results) == len(retriever)
    assert engine.saves() < adders  # writes queued behind a save were saved together, not one by one


def test_acknowledged_adds_survive_kill_9(tiny_export, tiny_index, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(tiny_index, index)
    port = free_port()
    process = start_serve(tiny_export, index, port)
    workers = 6
    acknowledged = add_until_killed(f"http://127.0.0.1:{port}", process, prefix="k", workers=workers)
    reopened = Retriever.from_dirs(tiny_export, index, providers=["cpu"])
    on_disk = {item for item in reopened.item_ids() if item.startswith("k")}
    assert len(acknowledged) >= 12
    assert acknowledged <= on_disk, sorted(acknowledged - on_disk)
    assert len(on_disk - acknowledged) <= workers  # at most the adds in flight at the kill


def test_serve_on_a_busy_port_is_one_line_and_exit_2_before_loading(tiny_export, tiny_index, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        missing = tmp_path / "no-such-export"  # loading it would fail differently: the port is checked first
        result = subprocess.run([sys.executable, "-m", "compir", "serve", str(missing), str(tiny_index), "--port", str(port)],
                                capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0] and "--port" in lines[0], result.stderr


def _ids_on_disk(index: Path) -> set[str]:
    """The ids a restart would open now (index.json names the generation of items file to read)."""
    for _ in range(50):
        record = json.loads((index / "index.json").read_text())
        try:
            return set(json.loads((index / record["files"]["items"]["file"]).read_text())["ids"])
        except FileNotFoundError:
            continue  # a save replaced that generation meanwhile: read the new one
    raise AssertionError(f"{index}: no consistent generation to read")
