"""The HTTP API on Ray Serve: a local Ray (2 CPUs), 2 HTTP replicas and the gallery owner, on
127.0.0.1, started once for this module. A representative part of the service's own API tests
(tests/test_service_api.py, imported, so they run here against the Ray app), and a write made
through one replica seen by the other (each response names its replica in X-Compir-Replica)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from compir.errors import ContractError, InputError
from compir.runtime import ray_cluster
from compir.runtime.encoder import Encoder
from compir.runtime.gallery import Gallery
from compir.runtime.retriever import Retriever
from compir.service import ray_owner, ray_serve
from compir.service.cli import main as serve_main
from compir.service.config import BatchingConfig, ServiceConfig
from compir.service.engine import ServiceEngine
from tests.fixtures.service import KEY, LIMITS, Served, assert_refused, free_port, hits_of, png_bytes
from tests.test_service_api import (  # noqa: F401  (pytest collects the imported tests here)
    test_a_multipart_body_cut_short_is_a_400_not_a_text_only_search,
    test_adding_an_existing_id_is_a_409_unless_replace,
    test_api_key_is_required_and_checked,
    test_bad_bodies_and_content_types_are_4xx,
    test_bad_gallery_uploads_add_nothing,
    test_bad_search_inputs_are_4xx_with_a_message,
    test_gallery_add_list_fetch_and_remove,
    test_health_ready_and_openapi,
    test_search_by_id_text_only_and_batch_agree_with_the_runtime,
    test_search_by_upload_returns_what_the_runtime_returns,
)

pytest.importorskip("ray.serve", reason='the Ray extra is not installed (pip install "compir[ray]")')

REPLICAS = 2
WAIT_MS = 30.0  # long enough that concurrent searches on a loaded 2-core machine share a @serve.batch


@pytest.fixture(scope="module")
def served(tiny_export: Path, tiny_index: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The Ray Serve app; ``retriever`` is a driver-side Retriever over the same owner (it sees every write)."""
    index_dir = tmp_path_factory.mktemp("service-ray") / "index"
    shutil.copytree(tiny_index, index_dir)
    config = ServiceConfig(limits=LIMITS, batching=BatchingConfig(wait_ms=WAIT_MS), api_key=KEY)
    spec = ray_serve.RaySpec(export_dir=str(tiny_export), index_dir=str(index_dir), config=config, providers=("cpu",),
                             scale=ray_serve.Scale(replicas=REPLICAS))
    try:
        url = ray_serve.start(spec, port=free_port(), num_cpus=2)
        gallery = ray_serve.GalleryProxy(ray_serve.owner_handle()).as_gallery()
        retriever = Retriever(Encoder.from_export(tiny_export, providers=["cpu"]), gallery)
        engine = ServiceEngine(retriever, config=ServiceConfig(batching=BatchingConfig(enabled=False)))
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as client:
            yield Served(url, client, retriever, engine, index_dir, synth_data / "images")
    finally:
        ray_serve.stop()


def _replica(response: httpx.Response) -> str:
    name = response.headers.get(ray_serve.REPLICA_HEADER)
    assert name, f"no {ray_serve.REPLICA_HEADER} header: {dict(response.headers)}"
    return name


def test_a_write_through_one_replica_is_seen_by_the_other(served, query):  # noqa: F811 (the fixture)
    files = [("files", ("cross-replica.png", png_bytes((44, 44), noise=True, seed=3), "image/png"))]
    added = served.client.post("/gallery/items", files=files)
    assert added.status_code == 200, added.text
    writer = _replica(added)
    form = {"text": query.text, "reference_id": "cross-replica", "k": 5}
    for _ in range(100):  # Serve spreads requests over the replicas: ask until the other one answers
        response = served.client.post("/search", data=form)
        if _replica(response) != writer:
            break
    else:
        pytest.fail(f"100 searches were all answered by replica {writer}; the other never was")
    expected = served.retriever.search(reference_id="cross-replica", text=query.text, k=5)
    assert [i for i, _ in hits_of(response)] == [h.item_id for h in expected]
    assert "cross-replica" not in [h.item_id for h in expected]  # the reference is left out of its own hits
    # And back: removed through the other replica, the writer no longer knows the id.
    removed = served.client.request("DELETE", "/gallery/items/cross-replica")
    assert removed.status_code == 200, removed.text
    remover = _replica(removed)
    for _ in range(100):
        response = served.client.post("/search", data=form)
        if _replica(response) != remover:
            break
    else:
        pytest.fail(f"100 searches were all answered by replica {remover}; the other never was")
    assert_refused(response, 404, "cross-replica")
    reopened = Retriever.from_dirs(served.retriever.encoder.export_dir, served.index_dir, providers=["cpu"])
    assert "cross-replica" not in reopened.item_ids() and len(reopened) == len(served.retriever)  # saved by the owner


def test_serve_batch_gathers_concurrent_searches(served, query):  # noqa: F811 (the fixture)
    form = {"text": query.text, "reference_id": query.reference, "k": 4}
    expected = [h.item_id for h in served.retriever.search(reference_id=query.reference, text=query.text, k=4)]

    def search(_: int) -> tuple[str, list[str]]:
        response = served.client.post("/search", data=form)
        return _replica(response), [i for i, _ in hits_of(response)]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(search, range(24)))
    assert all(hits == expected for _, hits in answers)
    sizes = set()
    for _ in range(40):  # /stats are per replica: read until both have reported
        response = served.client.get("/stats")
        sizes.add((_replica(response), response.json()["batching_stats"]["max_batch_seen"]))
        if len({name for name, _ in sizes}) == REPLICAS:
            break
    assert max(size for _, size in sizes) > 1, sizes  # concurrent searches shared one encoder call


def test_ray_options_are_checked_before_anything_starts(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        serve_main(["export", "index", "--replicas", "2"])
    assert "add --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_main(["export", "index", "--ray", "--replicas", "2", "--autoscale", "1:3"])
    for bad in ("3", "a:b", "0:2", "3:1"):
        with pytest.raises(InputError, match="--autoscale"):
            ray_serve.Scale(autoscale=ray_serve.Scale.parse_autoscale(bad))
    assert ray_serve.Scale(autoscale=(1, 4)).options() == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    with pytest.raises(InputError, match="cannot reach the Ray cluster"):  # not minutes of Ray's own retries
        ray_cluster.join_ray(None, f"ray://127.0.0.1:{free_port()}")  # refused before ray.init is needed
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(InputError, match=r'pip install "compir\[ray\]"'):
        serve_main(["export", "index", "--ray"])


def test_the_gallery_owner_dying_is_a_json_503_with_retry_after(served, query):  # noqa: F811 (the fixture); runs last
    import ray

    with pytest.raises(ContractError, match="open for writing by another process"):  # the owner holds the writer lock
        Gallery.load(served.index_dir, encoder=None, writable=True)

    form = {"text": query.text, "reference_id": query.reference, "k": 4}
    ray.kill(ray_serve.owner_handle(), no_restart=False)  # Ray restarts it: requests meanwhile are a 503 or wait
    for _ in range(120):
        response = served.client.post("/search", data=form)
        if response.status_code == 200:
            break
        assert response.status_code == 503 and response.headers["retry-after"].isdigit(), response.text
        assert "gallery owner" in response.json()["detail"]
        time.sleep(0.5)  # a client would wait Retry-After seconds
    assert response.status_code == 200, response.text  # the restarted owner reloaded the index
    ray.kill(ray_serve.owner_handle(), no_restart=True)  # gone for good: every gallery request is a 503
    response = served.client.post("/search", data=form)
    assert response.status_code == 503 and response.headers["retry-after"] == str(ray_owner.OWNER_RETRY_AFTER_S)
    assert response.headers["content-type"] == "application/json" and "gallery owner" in response.json()["detail"]
