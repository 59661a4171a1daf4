"""`compir serve` processes on one collection of a real Milvus server (tests/fixtures/milvus_server.py;
skipped with the reason where it cannot start): a write through one is seen by the other, the
same new id added through both at once is one 200 and one 409 (compir.runtime.milvus_claims), the
acknowledged adds of a serve process killed with -9 are kept, and a Milvus restart is a 503 JSON
body with Retry-After until the server is back, after which the same service answers again.
(The gallery and API tests that run on both Milvus Lite and the server are in test_index_milvus.py
and test_milvus_ids.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from compir.cli import main as compir_main
from compir.runtime.gallery import Gallery
from tests.fixtures.milvus_server import START_TIMEOUT_S, MilvusServer
from tests.fixtures.service import add, add_until_killed, assert_one_200_one_409, free_port, race, start_serve, stop_serve

pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
pytestmark = pytest.mark.usefixtures("milvus_server")  # first: where it cannot start, skip before the model fixtures are built


@pytest.fixture(scope="module")
def server_index(tiny_export: Path, synth_data: Path, milvus_server: MilvusServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny gallery in collection ``shared`` of the server; every serve process below opens this folder."""
    out = tmp_path_factory.mktemp("on-server") / "index"
    argv = ["index", "build", str(tiny_export), "--images", str(synth_data / "images"), "--out", str(out),
            "--milvus-uri", milvus_server.uri, "--collection", "shared", "--quiet", "--workers", "2"]
    assert compir_main(argv) == 0
    return out


@pytest.fixture
def serve(tiny_export: Path, server_index: Path) -> Iterator[str]:
    """A `compir serve` process of ``server_index``: its URL."""
    port = free_port()
    process = start_serve(tiny_export, server_index, port)
    yield f"http://127.0.0.1:{port}"
    stop_serve(process)


def test_two_serve_processes_share_one_collection(serve: str, tiny_export: Path, server_index: Path) -> None:
    other = start_serve(tiny_export, server_index, port := free_port())  # no writer lock: a server collection has many writers
    second = f"http://127.0.0.1:{port}"
    try:
        added = add(serve, "shared-1")
        assert added.status_code == 200, added.text
        assert httpx.get(f"{second}/gallery/count").json()["count"] == added.json()["count"]
        assert httpx.get(f"{second}/gallery/items/shared-1/image").status_code == 200  # the upload is in the shared folder
        by_id = httpx.post(f"{second}/search", data={"text": "make it red", "reference_id": "shared-1", "k": 5}, timeout=60)
        assert by_id.status_code == 200 and "shared-1" not in [hit["item_id"] for hit in by_id.json()["hits"]], by_id.text
        again = add(second, "shared-1", seed=1)
        assert again.status_code == 409 and "shared-1" in again.json()["detail"], again.text
        assert httpx.delete(f"{second}/gallery/items/shared-1", timeout=60).status_code == 200
        assert httpx.get(f"{serve}/gallery/items/shared-1/image").status_code == 404
    finally:
        stop_serve(other)


def test_two_serve_processes_racing_one_new_id_give_one_200_and_one_409(serve: str, tiny_export: Path, server_index: Path) -> None:
    other = start_serve(tiny_export, server_index, port := free_port())
    try:
        urls = [serve, f"http://127.0.0.1:{port}"]
        count = httpx.get(f"{serve}/gallery/count").json()["count"]
        for round_ in range(10):
            assert_one_200_one_409(race(urls, f"race-{round_}"), f"race-{round_}")
        assert httpx.get(f"{urls[1]}/gallery/count").json()["count"] == count + 10  # one row each
    finally:
        stop_serve(other)


def test_acknowledged_adds_survive_kill_9_of_a_serve_process(tiny_export: Path, server_index: Path, serve: str) -> None:
    doomed = start_serve(tiny_export, server_index, port := free_port())
    acknowledged = add_until_killed(f"http://127.0.0.1:{port}", doomed, prefix="k9-")
    assert len(acknowledged) >= 12
    held = Gallery.load(server_index, encoder=None).present(sorted(acknowledged))
    assert held == acknowledged, sorted(acknowledged - held)
    listed = httpx.get(f"{serve}/gallery/items", params={"limit": 1000}).json()
    assert acknowledged <= set(listed["items"])  # and the process still serving sees them


def test_a_milvus_restart_is_a_503_then_the_same_service_recovers(serve: str, milvus_server: MilvusServer,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    count = httpx.get(f"{serve}/gallery/count").json()["count"]
    first_start = milvus_server.start_s
    milvus_server.stop()
    for response in (httpx.get(f"{serve}/gallery/count", timeout=60),
                     httpx.post(f"{serve}/search", data={"text": "make it red", "k": 3}, timeout=60), add(serve, "while-down")):
        assert response.status_code == 503, response.text
        assert "unreachable or restarting" in response.json()["detail"] and response.headers["retry-after"] == "5"
    milvus_server.start()
    began, answer = time.monotonic(), httpx.get(f"{serve}/gallery/count", timeout=60)
    while answer.status_code == 503 and time.monotonic() - began < START_TIMEOUT_S:  # reloading its collections
        assert int(answer.headers["retry-after"]) > 0
        time.sleep(1)
        answer = httpx.get(f"{serve}/gallery/count", timeout=60)
    recovered = time.monotonic() - began
    assert answer.status_code == 200 and answer.json()["count"] == count, answer.text
    assert add(serve, "after-restart").status_code == 200
    with capsys.disabled():
        print(f"\nmilvus server: first start {first_start:.1f} s, restart {milvus_server.start_s:.1f} s, "
              f"the service answered again {recovered:.1f} s after the restart")
