"""Per-stage costs of ``compir index build --ray`` on 1, 2 and 3 Ray nodes simulated on this machine
(``ray.cluster_utils.Cluster``: a head with no CPUs that only coordinates, and N nodes, each its own
raylet and object store). On one machine the point is not speed: it is which costs are central
(paid by the driver, whatever the node count) and whether they grow with the gallery or the nodes.

    python -m benchmarks.ray_stages --export EXPORT_DIR --images DIR [--images DIR2] \
        [--milvus-uri http://127.0.0.1:19530] [--nodes 1 2 3] [--node-cpus 2] [--ray-batch-size 32]

Per build (nodes x gallery x backend), measured:
- the driver's CPU seconds per 1,000 images (``time.process_time`` of this process around the
  build, Ray's start excluded): usearch and Milvus Lite load every vector through the driver;
  into a Milvus server the encoder actors insert and the driver only coordinates;
- Milvus calls, the driver's (counted in this process) and the actors' (counted in each actor),
  per 1,000 images: Milvus is the only owner of the items, so there is no owner call per image;
- bytes that cross the object store per image: the blocks handed from the decode tasks to the
  encoder actors (pixels) and from the actors to the Parquet writers (vectors, or only the row
  receipts when the actors insert), as ``nbytes`` of the blocks each actor call takes and returns.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import markdown_table
from compir.runtime import build_ray, milvus_store

METER_ENV = "COMPIR_BENCH_RAY_METER"  # the folder each actor appends its counts to (set before the nodes start)


class MeteredEncodeRows(build_ray._EncodeRows):
    """The build's encoder actor, counting per call the blocks' bytes and its Milvus calls."""

    def __init__(self, **kwargs: Any) -> None:
        self.milvus_calls = _count_milvus_calls()
        super().__init__(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        before = self.milvus_calls[0]
        table = super().__call__(batch)
        record = {"images": len(batch["row"]), "in_bytes": int(sum(np.asarray(v).nbytes for v in batch.values())),
                  "out_bytes": int(table.nbytes), "milvus_calls": self.milvus_calls[0] - before}
        with open(Path(os.environ[METER_ENV]) / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as meter:
            meter.write(json.dumps(record) + "\n")
        return table


def _count_milvus_calls() -> list[int]:
    """Wrap every Milvus call of this process (they all go through ``milvus_store.call``); returns the counter."""
    counter = [0]
    original = milvus_store.call

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(*args, **kwargs)

    milvus_store.call = counted
    return counter


def measure(export_dir: Path, *, galleries: Sequence[Path], work: Path, nodes: Sequence[int], node_cpus: int,
            milvus_uri: str | None, ray_batch_size: int) -> list[dict[str, Any]]:
    """One row per (nodes, gallery, backend): usearch, and with ``milvus_uri`` a Milvus server
    (each row is also printed as JSON when measured, so an interrupted run keeps its rows). A first
    build on each cluster is not counted: it pays the driver's one-time imports and worker start-up."""
    import ray
    from ray.cluster_utils import Cluster

    from compir.runtime.build import list_images
    from compir.runtime.milvus_store import MilvusConfig

    meter = work / "meter"
    meter.mkdir(parents=True, exist_ok=True)
    os.environ[METER_ENV] = str(meter)
    build_ray._EncodeRows = MeteredEncodeRows  # type: ignore[misc]
    driver_calls = _count_milvus_calls()
    rows: list[dict[str, Any]] = []
    for count in nodes:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 << 20})
        for _ in range(count):
            cluster.add_node(num_cpus=node_cpus, object_store_memory=200 << 20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            build_ray.build_index_ray(export_dir, images=galleries[0], out=work / "warm-up", overwrite=True, providers=["cpu"],
                                      ray_batch_size=ray_batch_size, progress=False)
            for number, folder in enumerate(galleries):
                images = len(list_images(folder))
                for backend in ("usearch", "milvus server") if milvus_uri else ("usearch",):
                    name = f"n{count}_g{number}"
                    milvus = MilvusConfig(uri=milvus_uri, collection=f"bench_{name}") if backend != "usearch" and milvus_uri else None
                    for path in meter.glob("*.jsonl"):
                        path.unlink()
                    calls, cpu, wall = driver_calls[0], time.process_time(), time.perf_counter()
                    report = build_ray.build_index_ray(export_dir, images=folder, out=work / f"{name}-{backend.split()[0]}",
                                                       overwrite=True, overwrite_collection=milvus.collection if milvus else None,
                                                       milvus=milvus, providers=["cpu"], ray_batch_size=ray_batch_size,
                                                       progress=False)
                    cpu, wall, calls = time.process_time() - cpu, time.perf_counter() - wall, driver_calls[0] - calls
                    actor = [json.loads(line) for path in meter.glob("*.jsonl") for line in path.read_text().splitlines()]
                    rows.append({"nodes": count, "images": images, "indexed": report.count, "backend": backend, "wall_s": wall,
                                 "driver_cpu_s_per_1k": 1000 * cpu / images, "driver_milvus_calls": calls,
                                 "actor_milvus_calls_per_1k": 1000 * sum(r["milvus_calls"] for r in actor) / images,
                                 "blocks": len(actor), "decode_to_actor_bytes_per_image": sum(r["in_bytes"] for r in actor) / images,
                                 "actor_to_writer_bytes_per_image": sum(r["out_bytes"] for r in actor) / images})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    return markdown_table(
        ["nodes", "images", "gallery written by", "driver CPU s / 1,000 images",
         "Milvus calls: driver (per build) / actors per 1,000 images",
         "object store bytes / image: decode -> actor / actor -> writer", "wall s"],
        [[row["nodes"], row["images"], "driver (usearch)" if row["backend"] == "usearch" else "actors (Milvus server)",
          f"{row['driver_cpu_s_per_1k']:.2f}",
          "-" if row["backend"] == "usearch" else f"{row['driver_milvus_calls']} / {row['actor_milvus_calls_per_1k']:.0f}",
          f"{row['decode_to_actor_bytes_per_image']:,.0f} / {row['actor_to_writer_bytes_per_image']:,.0f}", f"{row['wall_s']:.1f}"]
         for row in rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_stages", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  python -m benchmarks.ray_stages --export exports/tiny --images photos/ "
                                            "--images more-photos/ --milvus-uri http://127.0.0.1:19530")
    parser.add_argument("--export", type=Path, required=True, help="export folder (compir export)")
    parser.add_argument("--images", type=Path, action="append", required=True, help="an image folder; repeat for several gallery sizes")
    parser.add_argument("--milvus-uri", default=None, help="a Milvus server: also build into it (the actors insert)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], help="simulated node counts (default: 1 2 3)")
    parser.add_argument("--node-cpus", type=int, default=2, help="CPUs each simulated node declares (default: %(default)s)")
    parser.add_argument("--ray-batch-size", type=int, default=build_ray.DEFAULT_RAY_BATCH_SIZE,
                        help="images per Ray block (default: %(default)s; small galleries need small blocks to reach every node)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/compir-ray-stages"), help="scratch folder (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = measure(args.export, galleries=args.images, work=args.work, nodes=args.nodes, node_cpus=args.node_cpus,
                   milvus_uri=args.milvus_uri, ray_batch_size=args.ray_batch_size)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
