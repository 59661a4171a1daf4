"""``compir serve --ray`` over a collection of a real Milvus server (tests/fixtures/milvus_server.py;
skipped with the reason where it cannot start): 2 HTTP replicas that each open the collection, no
gallery owner actor; a write through one replica is seen by the other, and the same new id added
twice at once is one 200 and one 409 (compir.runtime.milvus_claims). One local Ray for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from compir.cli import main as compir_main
from compir.service import ray_owner, ray_serve
from compir.service.config import BatchingConfig, ServiceConfig
from tests.fixtures.milvus_server import MilvusServer
from tests.fixtures.service import add, assert_one_200_one_409, free_port, race

pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
pytest.importorskip("ray.serve", reason='the Ray extra is not installed (pip install "compir[ray]")')
pytestmark = pytest.mark.usefixtures("milvus_server")  # first: where it cannot start, skip before the model fixtures are built


@pytest.fixture(scope="module")
def ray_app(tiny_export: Path, synth_data: Path, milvus_server: MilvusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Serve app (2 replicas) over the tiny gallery in collection ``ray_shared``: its URL."""
    index_dir = tmp_path_factory.mktemp("ray-on-server") / "index"
    argv = ["index", "build", str(tiny_export), "--images", str(synth_data / "images"), "--out", str(index_dir),
            "--milvus-uri", milvus_server.uri, "--collection", "ray_shared", "--quiet", "--workers", "2"]
    assert compir_main(argv) == 0
    spec = ray_serve.RaySpec(export_dir=str(tiny_export), index_dir=str(index_dir), providers=("cpu",),
                             config=ServiceConfig(batching=BatchingConfig(enabled=False)), scale=ray_serve.Scale(replicas=2))
    assert not ray_owner.needs_owner(spec.index_dir)
    try:
        yield ray_serve.start(spec, port=free_port(), num_cpus=2)
    finally:
        ray_serve.stop()


def _replica(response: httpx.Response) -> str:
    return response.headers[ray_serve.REPLICA_HEADER]


def test_no_gallery_owner_and_a_write_through_one_replica_is_seen_by_the_other(ray_app: str) -> None:
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    assert ray_owner.OWNER not in [actor["name"] for actor in named], named
    with pytest.raises(ValueError):
        ray_owner.owner_handle()
    added = add(ray_app, "via-one")
    assert added.status_code == 200, added.text
    writer = _replica(added)
    for _ in range(100):  # Serve spreads requests over the replicas: ask until the other one answers
        found = httpx.post(f"{ray_app}/search", data={"text": "make it red", "reference_id": "via-one", "k": 3}, timeout=60)
        if _replica(found) != writer:
            break
    else:
        pytest.fail(f"100 searches were all answered by replica {writer}; the other never was")
    assert found.status_code == 200, found.text  # the other replica composed from the new item's features


def test_ten_same_id_races_across_replicas_give_one_200_and_one_409_each(ray_app: str) -> None:
    count, pairs = httpx.get(f"{ray_app}/gallery/count").json()["count"], set()
    for round_ in range(10):
        answers = race([ray_app, ray_app], f"ray-race-{round_}")
        assert_one_200_one_409(answers, f"ray-race-{round_}")
        pairs.add(frozenset(_replica(answer) for answer in answers))
    assert any(len(pair) == 2 for pair in pairs), pairs  # some races did run on both replicas
    assert httpx.get(f"{ray_app}/gallery/count").json()["count"] == count + 10
