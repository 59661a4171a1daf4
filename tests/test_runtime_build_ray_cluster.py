"""``compir index build --ray`` on a multi-node Ray cluster simulated on this machine
(``ray.cluster_utils.Cluster``, as Ray's own tests do): a head that only coordinates (0 CPUs) and
two nodes of 3 CPUs, each its own raylet and object store; this process is the driver.
The shards folder is on this machine's disk, which every simulated node sees (a shared file system)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compir.runtime import build_ray
from tests.fixtures.ray_build import assert_same_gallery

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

NODES = 2
NODE_CPUS = 3  # per node: the encoder actor takes 1 (6 CPUs // (2 x 2 actors)), the rest decode


@pytest.fixture
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 << 20})
    for _ in range(NODES):
        cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=100 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_actors_spread_over_the_nodes_and_the_index_is_the_single_process_one(
    cluster: Any, tiny_export: Path, gallery_images: Path, single_process_index: tuple[Path, str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    placed = tmp_path / "placed"
    placed.mkdir()

    class Placed(build_ray._EncodeRows):
        """Records the node each encoder actor starts on."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            (placed / f"{ray.get_runtime_context().get_node_id()}-{id(self)}").touch()

    monkeypatch.setattr(build_ray, "_EncodeRows", Placed)
    report = build_ray.build_index_ray(tiny_export, images=gallery_images, out=tmp_path / "index", ray_batch_size=3, batch_size=4,
                                       providers=["cpu"], progress=False)  # the default pool: one actor per node with CPUs
    actor_nodes = [path.name.split("-")[0] for path in placed.iterdir()]
    workers = {node.node_id for node in cluster.list_all_nodes() if node is not cluster.head_node}
    assert len(actor_nodes) == NODES and set(actor_nodes) == workers, actor_nodes  # one actor on each node, none on the head
    assert report.count == 12 and len(report.skipped) == 2
    assert_same_gallery(tmp_path / "index", single_process_index[0])


@pytest.mark.slow  # ~90 s on 2 loaded cores: a second cluster, blocks slowed to 1 s each, an actor restarted
def test_a_node_removed_mid_build_and_the_build_finishes(
    cluster: Any, tiny_export: Path, gallery_images: Path, single_process_index: tuple[Path, str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = tmp_path / "calls"
    calls.mkdir()

    class Slow(build_ray._EncodeRows):
        """Each call names its node, then takes a second: blocks are in flight on both nodes when one goes."""

        def __call__(self, batch: dict[str, np.ndarray]) -> Any:
            (calls / f"{ray.get_runtime_context().get_node_id()}-{int(batch['row'][0])}").touch()
            time.sleep(1.0)
            return super().__call__(batch)

    removed: list[str] = []

    def remove_the_first_busy_node() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not removed:
            busy = {path.name.split("-")[0] for path in calls.iterdir()}
            for node in cluster.list_all_nodes():
                if node is not cluster.head_node and node.node_id in busy:
                    cluster.remove_node(node, allow_graceful=False)  # as a machine lost: raylet and workers killed
                    removed.append(node.node_id)
                    return
            time.sleep(0.05)

    monkeypatch.setattr(build_ray, "_EncodeRows", Slow)
    watcher = threading.Thread(target=remove_the_first_busy_node, daemon=True)
    watcher.start()
    report = build_ray.build_index_ray(tiny_export, images=gallery_images, out=tmp_path / "index", ray_batch_size=2, batch_size=4,
                                       providers=["cpu"], progress=False)
    watcher.join(timeout=5)
    assert removed, "no node was removed: the test tested nothing"
    assert {path.name.split("-")[0] for path in calls.iterdir()} - set(removed), "no block ran on the surviving node"
    assert report.count == 12 and len(report.skipped) == 2
    assert_same_gallery(tmp_path / "index", single_process_index[0])
