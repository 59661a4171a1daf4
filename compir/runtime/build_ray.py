"""Build a gallery index on Ray Data: the same index as :func:`compir.runtime.build.build_index`,
with decoding and encoding spread over a Ray cluster (or a local Ray on this machine's cores).

    image paths (driver, file order)
      -> decode + preprocess   Ray tasks, ``decode_for_encoder`` (the single-process build's own)
      -> encode                a pool of actors, each holding the runtime's Encoder (onnxruntime or
                               TensorRT); one per GPU where Ray sees GPUs
      -> Parquet shards        row, item_id, path, error, image_embeds, image_features (flattened)
      -> the gallery           the shards in file order through ``write_index``: the same add/save
                               as the single-process build, so the folder is identical in format

Into a Milvus server (``milvus`` with an ``http://`` URI), no process sits in the middle: the
driver creates the collection, each encoder actor upserts its own blocks into it (``added`` = the
build's start + the file's row, so the ids list in file order as after a single-process build),
and the shards keep only row, item_id, path and error; the driver then reads those receipts,
reports the failures, checks the collection's count and writes index.json. usearch (one file) and
Milvus Lite (one process per file) keep the driver's load step, as does ``copy_images`` (the
driver copies every image into the folder anyway). A retried block upserts the same rows again.

A worker that dies takes its batch with it: Ray Data re-runs the task, or restarts the actor and
retries the call (its defaults: ``max_retries=-1`` for tasks, ``max_restarts=-1`` and
``max_task_retries=-1`` for actors, i.e. on system failures, without limit; an exception raised by
our code is not retried but fails the build); the loader keeps exactly one row per image. Ray is
imported only when this runs (``pip install "compir[ray]"``). On a multi-node cluster the export,
the images and the shard folder must be at paths every node sees (a shared file system).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compir.contracts import check_output_dir
from compir.errors import CompirError, ContractError, InputError
from compir.manifest import PreprocessSpec, load_manifest
from compir.runtime.build import BuildReport, EncodedBatch, IndexTarget, decode_for_encoder, gallery_files, write_index
from compir.runtime.encoder import Encoder, image_feature_shape
from compir.runtime.index import DEFAULT_DTYPE, HnswConfig
from compir.runtime.milvus_client import is_server
from compir.runtime.ray_cluster import engine_logs, import_ray, join_ray

if TYPE_CHECKING:
    from compir.runtime.milvus_store import MilvusConfig

RAY_LOG = "logs/ray.log"  # of the index folder: what Ray printed during the build (a failed build names its log instead)
DEFAULT_RAY_BATCH_SIZE = 256  # images per Ray block: one decode task, one actor call, one shard file
_DECODE_WORKER_BYTES = 320 * 2**20  # a decode worker's own memory, ~210 MiB measured, with Ray's 1.25x margin


def build_index_ray(
    export_dir: str | Path,
    *,
    images: str | Path,
    out: str | Path,
    address: str | None = None,
    actors: int | None = None,
    ray_batch_size: int = DEFAULT_RAY_BATCH_SIZE,
    batch_size: int = 64,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    variant: str | None = None,
    dtype: str = DEFAULT_DTYPE,
    copy_images: bool = False,
    overwrite: bool = False,
    hnsw: HnswConfig = HnswConfig(),
    milvus: MilvusConfig | None = None,
    overwrite_collection: str | None = None,
    shards: str | Path | None = None,
    progress: bool = True,
) -> BuildReport:
    """Encode every image under ``images`` on Ray into a new index folder ``out``.

    Joins the running Ray of this process if there is one, else the cluster at ``address``, else
    starts a local Ray on this machine's cores (and shuts down what it started). ``actors``:
    encoder actors (default: one per GPU, or on CPUs one per node holding half its cores).
    ``batch_size``: images per encoder call inside an actor. ``milvus``: the items go into that
    collection, as with :func:`~compir.runtime.build.build_index`. ``shards``: a new folder where the
    Parquet shards are kept; by default they go to a temporary folder beside ``out``, removed after.
    The report's ``seconds`` count from the first task to the saved index (not Ray's start-up).
    Into a Milvus server the encoder actors insert the items themselves (module docstring).
    Ray's own output goes to ``out/logs/ray.log``, not the terminal (a failure's message names the log).
    """
    if min(ray_batch_size, batch_size, 1 if actors is None else actors) < 1:
        raise InputError("--ray-batch-size, --batch-size and --ray-actors must be >= 1")
    ray = import_ray("data")
    manifest = load_manifest(export_dir)  # a bad export is refused before Ray starts
    target = IndexTarget(encoder=manifest.encoder_fingerprint(), ndim=manifest.embed_dim,
                         feature_shape=image_feature_shape(manifest, variant), dtype=dtype, hnsw=hnsw, milvus=milvus)
    check_output_dir(out, overwrite=overwrite)
    found = gallery_files(images)
    files, ids = found.files, found.ids
    keep_shards = shards is not None
    if shards is not None and Path(shards).exists() and any(Path(shards).iterdir()):
        raise InputError(f"shard folder {shards} is not empty; name a new one (its files would be loaded too)")
    shard_dir = Path(shards) if shards is not None else Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.shards.", dir=_parent(out)))
    started = not ray.is_initialized()
    log = Path(tempfile.mkstemp(prefix=f".{Path(out).name}.ray.", suffix=".log", dir=_parent(out))[1])  # Ray's own output
    direct = milvus if milvus is not None and is_server(milvus.uri) and not copy_images else None  # the actors insert
    try:
        with engine_logs(log):
            if started:
                join_ray(ray, address)
        start = time.perf_counter()
        run = partial(_run_pipeline, ray, export_dir=Path(export_dir).resolve(), spec=manifest.preprocess, files=files, ids=ids,
                      shards=shard_dir, actors=actors, ray_batch_size=ray_batch_size, batch_size=batch_size, backend=backend,
                      providers=providers, variant=variant, progress=progress)
        batches: Iterable[EncodedBatch] = ()
        if files and direct is not None:
            batches = _inserted_by_workers(run, milvus=direct, log=log, shards=shard_dir, files=files, ids=ids, target=target,
                                           batch_size=batch_size)
        elif files:
            with engine_logs(log):
                run(store=None)
            batches = _shard_batches(shard_dir, files=files, ids=ids, target=target, batch_size=batch_size)
        report = write_index(batches, target=target, out=out, total=len(files), copy_images=copy_images, overwrite=overwrite,
                             overwrite_collection=overwrite_collection, progress=progress, start=start, skipped=found.skipped)
    except CompirError as exc:
        raise type(exc)(f"{exc} (Ray's log: {log})") from exc
    finally:
        if started:
            with engine_logs(log):
                ray.shutdown()
        if not keep_shards:
            shutil.rmtree(shard_dir, ignore_errors=True)
    (Path(out) / RAY_LOG).parent.mkdir(exist_ok=True)
    shutil.move(log, Path(out) / RAY_LOG)
    return report


def _parent(out: str | Path) -> Path:
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _run_pipeline(
    ray: Any, *, export_dir: Path, spec: PreprocessSpec, files: Sequence[Path], ids: Sequence[str], shards: Path,
    actors: int | None, ray_batch_size: int, batch_size: int, backend: str, providers: Sequence[str] | None,
    variant: str | None, progress: bool, store: dict[str, Any] | None,
) -> None:
    """Decode in tasks, encode in an actor pool, write Parquet shards into ``shards``; with ``store``
    (:func:`_worker_store`) the actors insert the items there and the shards hold no vectors."""
    import pyarrow as pa

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    pool, actor_args = _actor_pool(ray, actors)
    rows = pa.table({"row": np.arange(len(files), dtype=np.int64), "item_id": list(ids), "path": [str(p) for p in files]})
    blocks = [rows.slice(offset, ray_batch_size) for offset in range(0, len(files), ray_batch_size)]
    encoder_args = {"export_dir": str(export_dir), "backend": backend, "providers": list(providers) if providers else None,
                    "variant": variant, "threads": actor_args.pop("threads"), "batch_size": batch_size, "store": store}
    dataset = (
        ray.data.from_arrow(blocks)
        # ``memory``: a decode worker and its pixels. It also keeps Ray Data from fusing
        # decoding into the encoder actors (it fuses stages that ask for the same resources): actors only encode.
        .map_batches(_decode_rows, fn_kwargs={"spec": spec}, batch_size=ray_batch_size, batch_format="numpy",
                     memory=_DECODE_WORKER_BYTES + ray_batch_size * 3 * spec.image_size**2 * 4)
        .map_batches(_EncodeRows, fn_constructor_kwargs=encoder_args, batch_size=ray_batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=pool), **actor_args)
    )
    try:
        dataset.write_parquet(str(shards))
    except ray.exceptions.RayError as exc:  # its last line is the worker's own error
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise ContractError(f"the Ray indexing job failed: {lines[-1].strip()}") from exc


def _actor_pool(ray: Any, actors: int | None) -> tuple[int, dict[str, Any]]:
    """(pool size, resources per actor + onnxruntime threads): one actor per GPU; on CPUs, one per
    node that has CPUs by default (a head started with ``--num-cpus 0`` only coordinates), each
    reserving half the cores it shares (the rest decode), as many threads. Ray Data spreads the
    pool's actors over the nodes (its default scheduling strategy, SPREAD)."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        pool = actors or gpus
        if pool > gpus:
            raise InputError(f"--ray-actors {pool}: each encoder actor takes one GPU and Ray sees {gpus}")
        return pool, {"num_gpus": 1, "num_cpus": 1, "threads": 1}
    pool = actors or max(1, sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= 1))
    per_actor = max(1, cpus // (2 * pool))
    return pool, {"num_cpus": per_actor, "threads": per_actor}


def _decode_rows(batch: dict[str, np.ndarray], spec: PreprocessSpec) -> dict[str, np.ndarray]:
    """Ray task: adds ``pixel_values`` (B, 3, S, S) (zeros where the file failed) and ``error``."""
    size = spec.image_size
    pixels = np.zeros((len(batch["path"]), 3, size, size), np.float32)
    errors = []
    for row, path in enumerate(batch["path"]):
        decoded = decode_for_encoder(Path(str(path)), spec)
        if isinstance(decoded, str):
            errors.append(decoded)
        else:
            pixels[row] = decoded
            errors.append("")
    return {**batch, "error": np.asarray(errors, dtype=object), "pixel_values": pixels}


class _EncodeRows:
    """Ray actor: the runtime's Encoder, loaded once; pixels in, flattened vectors out, or with
    ``store`` (:func:`_worker_store`) the vectors upserted into that Milvus collection and only the
    row receipts out."""

    def __init__(self, *, export_dir: str, backend: str, providers: list[str] | None, variant: str | None, threads: int,
                 batch_size: int, store: dict[str, Any] | None = None) -> None:
        self.encoder = Encoder.from_export(export_dir, backend=backend, providers=providers, variant=variant,
                                           spinning=False, threads=threads)
        self.batch_size = batch_size
        self.store, self.added_base = None, 0
        if store is not None:
            from compir.runtime.milvus_store import MilvusStore

            self.store = MilvusStore.open(store["record"], encoder=None, source="the Ray build's collection")
            self.added_base = int(store["added_base"])

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        good = np.flatnonzero(batch["error"] == "")
        count = len(batch["row"])
        embeds = np.zeros((count, self.encoder.embed_dim), np.float32)  # failed rows keep zeros; the loader skips them
        features = np.zeros((count, math.prod(self.encoder.feature_shape)), np.float32)
        for offset in range(0, len(good), self.batch_size):
            rows = good[offset : offset + self.batch_size]
            encoded = self.encoder.encode_pixels(batch["pixel_values"][rows])
            embeds[rows] = encoded.image_embeds
            features[rows] = encoded.image_features.reshape(len(rows), -1)
        receipts = {
            "row": pa.array(batch["row"], pa.int64()),
            "item_id": pa.array(batch["item_id"].tolist(), pa.string()),
            "path": pa.array(batch["path"].tolist(), pa.string()),
            "error": pa.array(batch["error"].tolist(), pa.string()),
        }
        if self.store is None:
            return pa.table({**receipts, "image_embeds": _fixed_lists(embeds), "image_features": _fixed_lists(features)})
        if len(good):
            self.store.add([str(batch["item_id"][row]) for row in good], embeds=embeds[good], features=features[good],
                           paths=[str(batch["path"][row]) for row in good],
                           added=[self.added_base + int(batch["row"][row]) for row in good])
        return pa.table(receipts)


def _fixed_lists(array: np.ndarray) -> Any:
    """(N, K) float32 -> an Arrow fixed_size_list<float32>[K] column (plain Parquet, readable without Ray)."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), pa.float32()), array.shape[1])


def _worker_store(milvus: MilvusConfig, target: IndexTarget) -> dict[str, Any]:
    """What an encoder actor needs to open the build's collection and stamp its rows (``added``)."""
    record = {"milvus": milvus.resolved().record(), "embed_dim": target.ndim, "feature_shape": list(target.feature_shape)}
    return {"record": record, "added_base": time.time_ns()}


def _inserted_by_workers(
    run: Callable[..., None], *, milvus: MilvusConfig, log: Path, shards: Path, files: Sequence[Path], ids: Sequence[str],
    target: IndexTarget, batch_size: int,
) -> Iterator[EncodedBatch]:
    """``write_index``'s batches where the encoder actors insert: iterated once ``write_index`` has
    created the collection, it runs the pipeline, checks that the collection holds every image that
    was read, and yields only the failures in file order (the driver inserts nothing)."""
    from compir.runtime.milvus_store import MilvusStore

    store = _worker_store(milvus, target)
    with engine_logs(log):
        run(store=store)
    errors = _receipts(shards, files=files, ids=ids).column("error").to_pylist()
    expected = errors.count("")
    found = MilvusStore.open(store["record"], encoder=None, source="the Ray build's collection").count()
    if found != expected:
        raise ContractError(f"the encoder actors read {expected} images but collection {milvus.collection!r} at {milvus.uri} "
                            f"holds {found}")
    for offset in range(0, len(files), batch_size):
        span = range(offset, min(offset + batch_size, len(files)))
        good = sum(1 for row in span if not errors[row])
        yield EncodedBatch(ids=[], paths=[], image_embeds=np.zeros((0, target.ndim), np.float32),
                           image_features=np.zeros((0, *target.feature_shape), np.float32),
                           errors=[(str(files[row]), errors[row]) for row in span if errors[row]], inserted=good)


def _receipts(shards: Path, *, files: Sequence[Path], ids: Sequence[str]) -> Any:
    """The shards' rows (an Arrow table) in file order, each image exactly once (a retried batch
    written twice is read once); a ContractError where an image is missing or the ids differ."""
    import pyarrow.dataset as pads

    table = pads.dataset(str(shards), format="parquet").to_table().sort_by("row")
    rows = table.column("row").to_numpy()
    unique, first = np.unique(rows, return_index=True)
    if not np.array_equal(unique, np.arange(len(files))):
        raise ContractError(f"the shards in {shards} hold {len(unique)} of the {len(files)} images; on a cluster of several "
                            "machines, name a --shards folder that every node sees")
    table = table.take(first)
    if table.column("item_id").to_pylist() != list(ids):
        raise ContractError(f"the shards in {shards} do not belong to this image folder; name a new --shards folder")
    return table


def _shard_batches(
    shards: Path, *, files: Sequence[Path], ids: Sequence[str], target: IndexTarget, batch_size: int
) -> Iterator[EncodedBatch]:
    """The shards' rows in file order as the batches the single-process build makes (failures as (file, reason))."""
    table = _receipts(shards, files=files, ids=ids)
    width = math.prod(target.feature_shape)
    embeds, features = _matrix(table, "image_embeds", target.ndim), _matrix(table, "image_features", width)
    errors = table.column("error").to_pylist()
    for offset in range(0, len(files), batch_size):
        span = range(offset, min(offset + batch_size, len(files)))
        good = [row for row in span if not errors[row]]
        yield EncodedBatch(
            ids=[ids[row] for row in good], paths=[files[row] for row in good],
            image_embeds=embeds[good], image_features=features[good].reshape(len(good), *target.feature_shape),
            errors=[(str(files[row]), errors[row]) for row in span if errors[row]],
        )


def _matrix(table: Any, column: str, width: int) -> np.ndarray:
    values = table.column(column).combine_chunks()
    if values.type.list_size != width:
        raise ContractError(f"shard column {column!r} holds {values.type.list_size} values per image, the export gives {width}")
    return np.asarray(values.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(table), width)
