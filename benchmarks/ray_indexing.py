"""Rows of ``compir bench runtime`` for ``compir index build --ray``: Ray Data on a local Ray with
this machine's cores against the single-process build on the same cores, and a projection to N
machines from the stages measured here.

Measured (median of ``repeats`` runs each):
- Ray's fixed cost per build (actor start, model load, scheduling) and its steady rate, from builds
  of two gallery sizes (rate = extra images / extra seconds), Ray's own start-up timed apart;
- one encoder actor's rate: the actor's own call on decoded batches, in this process, with the
  threads the default pool gives it (half the cores);
- decoding per core, and the driver's load step (shards -> gallery add -> save), which is serial.
Projected: N machines like this one each run one actor and decode on their other cores
(min of the two rates); the load step stays one process:
images/s = 1 / (1 / (N x machine rate) + 1 / load rate).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table

PROJECTED_NODES = (1, 4, 16, 64)


def measure(export_dir: Path, *, small: Path, large: Path, work: Path, repeats: int, single_images_per_s: float) -> dict[str, Any]:
    """Figures of Ray Data indexing on a local Ray with every core of this machine."""
    import ray

    from compir.manifest import load_manifest
    from compir.runtime.build import list_images
    from compir.runtime.build_ray import DEFAULT_RAY_BATCH_SIZE, build_index_ray

    cores = os.cpu_count() or 1
    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, configure_logging=False)
    startup_s = time.perf_counter() - start
    sizes = {name: len(list_images(folder)) for name, folder in (("small", small), ("large", large))}
    runs: dict[str, list[float]] = {"small": [], "large": []}
    try:
        for number in range(repeats + 1):  # the first round warms the workers up (imports) and is not counted
            for name, folder in (("small", small), ("large", large)):
                shards = work / f"shards-{name}"
                shutil.rmtree(shards, ignore_errors=True)
                report = build_index_ray(export_dir, images=folder, out=work / f"ray-{name}", overwrite=True, providers=["cpu"],
                                         shards=shards, progress=False)
                if number:
                    runs[name].append(report.seconds)
    finally:
        ray.shutdown()
    small_s, large_s = statistics.median(runs["small"]), statistics.median(runs["large"])
    # Steady rate from the extra images of the large build; None when noise hides it (a busy machine).
    steady = (sizes["large"] - sizes["small"]) / (large_s - small_s) if large_s > small_s else None
    threads = max(1, cores // 2)  # what the default pool gives its one actor on one machine
    actor = _actor_rate(export_dir, large, threads=threads, batch=DEFAULT_RAY_BATCH_SIZE, repeats=repeats)
    decode = _decode_rate(large, load_manifest(export_dir).preprocess, repeats=repeats)
    load = _load_rate(export_dir, large, work / "shards-large", work / "loaded", repeats=repeats)
    node = min(actor, decode * (cores - threads))  # one machine: its actor and its decoding cores, the slower of the two
    projected = {nodes: 1 / (1 / (nodes * node) + 1 / load) for nodes in PROJECTED_NODES}
    end_to_end = sizes["large"] / large_s
    return {
        "cores": cores, "images": sizes, "ray_startup_s": startup_s, "runs_s": runs, "ray_end_to_end_images_per_s": end_to_end,
        "ray_fixed_s": small_s - sizes["small"] / steady if steady else small_s, "ray_steady_images_per_s": steady,
        "single_images_per_s": single_images_per_s, "ray_over_single": (steady or end_to_end) / single_images_per_s,
        "actor_threads": threads, "actor_images_per_s": actor, "decode_images_per_s_per_core": decode, "load_images_per_s": load,
        "node_images_per_s": node, "projected_images_per_s": projected,
    }


def table(figures: dict[str, Any], *, cpu: str) -> str:
    if "skipped" in figures:
        return f"Ray Data indexing: skipped ({figures['skipped']})."
    steady = figures["ray_steady_images_per_s"]
    rows = [
        ["single process (`compir index build`)", f"{figures['single_images_per_s']:.1f}", "measured"],
        [f"Ray Data, end to end ({figures['images']['large']} images)", f"{figures['ray_end_to_end_images_per_s']:.1f}", "measured"],
        ["Ray Data, steady (after its fixed cost)", f"{steady:.1f}" if steady else "hidden by noise", "measured"],
        [f"one encoder actor ({figures['actor_threads']} thread(s))", f"{figures['actor_images_per_s']:.1f}", "measured"],
        ["decoding, per core", f"{figures['decode_images_per_s_per_core']:.1f}", "measured"],
        ["load step (shards -> gallery, one process)", f"{figures['load_images_per_s']:.1f}", "measured"],
        ["one machine like this one: min(actor, decoding on the other cores)", f"{figures['node_images_per_s']:.1f}", "from the above"],
        *[[f"{nodes} machine(s) like this one", f"{rate:.1f}", "projected"] for nodes, rate in figures["projected_images_per_s"].items()],
    ]
    return "\n\n".join([
        f"Ray Data indexing (`compir index build --ray`), local Ray with all {figures['cores']} cores of this machine ({cpu}), "
        f"default model, onnxruntime CPU; medians of the runs after a warm-up round. Ray start-up {figures['ray_startup_s']:.1f} s "
        f"(once per cluster), then a fixed {figures['ray_fixed_s']:.1f} s per build (actors start, models load); Ray / single "
        f"process at equal cores = {figures['ray_over_single']:.2f}x ({'steady' if steady else 'end to end'}).",
        markdown_table(["what", "images/s", ""], rows),
        "Projected rows: N machines each run one encoder actor and decode on their other cores (the per-machine rate above); "
        "the load step (one process: read the shards, add to the gallery, save) is serial: images/s = "
        "1 / (1 / (N x machine rate) + 1 / load rate). Not measured on a cluster.",
    ])


def _actor_rate(export_dir: Path, images: Path, *, threads: int, batch: int, repeats: int) -> float:
    """Images/s of one encoder actor's call (what the pool runs), on decoded batches, in this process."""
    import numpy as np

    from compir.manifest import load_manifest
    from compir.runtime.build import list_images
    from compir.runtime.build_ray import _decode_rows, _EncodeRows

    files = list_images(images)[:batch]
    spec = load_manifest(export_dir).preprocess
    rows = {"row": np.arange(len(files)), "item_id": np.asarray([p.stem for p in files], object),
            "path": np.asarray([str(p) for p in files], object)}
    decoded = _decode_rows(rows, spec)
    actor = _EncodeRows(export_dir=str(export_dir), backend="onnxruntime", providers=["cpu"], variant=None, threads=threads, batch_size=64)
    actor(decoded)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        actor(decoded)
        times.append(time.perf_counter() - start)
    return len(files) / statistics.median(times)


def _decode_rate(images: Path, spec: Any, *, repeats: int) -> float:
    from compir.runtime.build import decode_for_encoder, list_images

    files = list_images(images)[:256]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            decode_for_encoder(path, spec)
        times.append(time.perf_counter() - start)
    return len(files) / statistics.median(times)


def _load_rate(export_dir: Path, images: Path, shards: Path, out: Path, *, repeats: int) -> float:
    """The driver's serial step alone: kept shards -> ``write_index`` (gallery add + save)."""
    from compir.manifest import load_manifest
    from compir.runtime.build import IndexTarget, item_id_for, list_images, write_index
    from compir.runtime.build_ray import _shard_batches
    from compir.runtime.encoder import image_feature_shape

    manifest = load_manifest(export_dir)
    target = IndexTarget(encoder=manifest.encoder_fingerprint(), ndim=manifest.embed_dim, feature_shape=image_feature_shape(manifest))
    root = images.resolve()
    files = list_images(root)
    ids = [item_id_for(path, root) for path in files]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        batches = _shard_batches(shards, files=files, ids=ids, target=target, batch_size=64)
        write_index(batches, target=target, out=out, total=len(files), overwrite=True, progress=False)
        times.append(time.perf_counter() - start)
    return len(files) / statistics.median(times)
