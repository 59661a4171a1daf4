"""``compir serve EXPORT INDEX --ray``: the service's own FastAPI app on Ray Serve replicas.

Two deployments make one Serve application:

- ``GalleryOwner`` (one Ray actor, the "usearch writer replica"): holds the one real
  :class:`~compir.runtime.gallery.Gallery` and does every index operation (search, add, remove,
  save, reference features by id), so a write made through any HTTP replica is seen by all. A
  plain actor, not a Serve deployment: a call costs about 0.6 ms against 3.4 ms through a Serve
  handle (measured here), and a search makes up to four of them.
- ``ServiceReplica`` (N replicas, or autoscaled): each opens the export's encoders and builds the
  app with :func:`compir.service.app.create_app` (same routes, limits, API key, error bodies)
  over a Retriever whose gallery is a :class:`GalleryProxy` calling the owner. Image decode,
  encode and compose (what costs) run here and scale with the replicas; with batching on (auto:
  GPU encoders), ``@serve.batch`` gathers concurrent searches into one encoder call.

Every write is saved by the owner before it is answered, so the owner, restarted by Ray after
a crash, reloads the same index from disk; a request that meets a dead or restarting owner is a
503 with Retry-After (the API's JSON body). The owner holds the index's writer lock. Ray is an
optional extra, imported only here, inside the functions that need it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, Generic, cast

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compir.errors import CompirError, ContractError, InputError, UnavailableError
from compir.runtime.backends.providers import GPU_PROVIDERS, canonical_provider
from compir.runtime.ray_cluster import LOCAL, import_ray, join_ray
from compir.service.batcher import BatchCounter, BatchStats, Item, Result, run_batch
from compir.service.config import ServiceConfig, resolve_batching

if TYPE_CHECKING:
    from fastapi import FastAPI

    from compir.runtime.gallery import Gallery

APP_NAME = "compir"
OWNER = "compir-gallery-owner"  # the owner actor's name, in namespace APP_NAME
REPLICA_HEADER = "x-compir-replica"  # which HTTP replica answered (responses from --ray only)
OWNER_RETRY_AFTER_S = 5  # a 503's Retry-After while Ray restarts a dead owner (it reloads the index from disk)


def import_serve() -> tuple[ModuleType, ModuleType]:
    """(ray, ray.serve), or an InputError naming the extra to install."""
    ray = import_ray("serve")
    return ray, ray.serve


@dataclass(frozen=True)
class Scale:
    """A fixed number of HTTP replicas, or autoscaling between ``autoscale`` = (min, max)."""

    replicas: int = 2
    autoscale: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InputError(f"--replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 < low <= high:
                raise InputError(f"--autoscale MIN:MAX needs 1 <= MIN <= MAX, got {low}:{high}")

    @classmethod
    def parse_autoscale(cls, text: str) -> tuple[int, int]:
        low, sep, high = text.partition(":")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise InputError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4, not {text!r}")
        return int(low), int(high)

    def options(self) -> dict[str, Any]:
        if self.autoscale is None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {"min_replicas": self.autoscale[0], "max_replicas": self.autoscale[1]}}

    def describe(self) -> str:
        return f"{self.replicas} replicas" if self.autoscale is None else f"autoscaled {self.autoscale[0]}-{self.autoscale[1]} replicas"


@dataclass(frozen=True)
class RaySpec:
    """Everything a replica needs to open the export and serve (pickled to the replicas)."""

    export_dir: str
    index_dir: str
    config: ServiceConfig
    batching_mode: str | None = None  # "auto"/"on"/"off": resolved on the replica (it knows its encoders); None: config's
    backend: str = "onnxruntime"
    providers: tuple[str, ...] | None = None
    variant: str | None = None
    scale: Scale = Scale()
    prompt_template: str | None = None  # a zero-shot export's query-time template (None: the export's)

    @property
    def wants_gpu(self) -> bool:
        """TensorRT, or onnxruntime asked for CUDA / TensorRT (its default, None, tries CUDA first)."""
        if self.backend == "tensorrt" or self.providers is None:
            return True
        return any(canonical_provider(p) in GPU_PROVIDERS for p in self.providers)


# ---- the gallery owner -----------------------------------------------------------------------------
class GalleryOwner:
    """The one Gallery of the application; the HTTP replicas call it through :class:`GalleryProxy`.

    Ray runs these methods on a thread pool (``max_concurrency``): reads share a lock, writes take it alone."""

    def __init__(self, export_dir: str, index_dir: str) -> None:
        from compir.manifest import load_manifest, manifest_sha256
        from compir.runtime.gallery import Gallery
        from compir.service.engine import ReadWriteLock

        manifest = load_manifest(export_dir, verify_files=False)  # the fingerprint only: the CLI and each replica verify the graphs
        self._gallery = Gallery.load(Path(index_dir), encoder=manifest.encoder_fingerprint(),
                                     manifest_sha256=manifest_sha256(export_dir), writable=True)  # the one writer
        self._lock = ReadWriteLock()

    def count(self) -> int:
        with self._lock.read():
            return len(self._gallery)

    def contains(self, item_id: str) -> bool:
        with self._lock.read():
            return item_id in self._gallery

    def present(self, ids: list[str]) -> set[str]:
        with self._lock.read():
            return self._gallery.present(ids)

    def item_ids(self) -> list[str]:
        with self._lock.read():
            return list(self._gallery.ids)

    def describe(self) -> dict[str, Any]:
        with self._lock.read():
            return self._gallery.describe()

    def image_paths(self, ids: list[str]) -> list[Path | None]:
        with self._lock.read():
            return self._gallery.image_paths(ids)

    def features_of(self, ids: list[str]) -> np.ndarray:
        with self._lock.read():
            return self._gallery.features_of(ids)

    def search(self, queries: np.ndarray, k: int, exclude: list[str | None]) -> list[list[tuple[str, float]]]:
        with self._lock.read():
            return self._gallery.search(queries, k=k, exclude=exclude)

    def store_image(self, data: bytes, suffix: str) -> str:
        with self._lock.write():
            return self._gallery.store_image(data, suffix=suffix)

    def add(self, ids: list[str], embeds: np.ndarray, features: np.ndarray, paths: list[str], replace: bool) -> None:
        with self._lock.write():
            self._gallery.add(ids, embeds=embeds, features=features, paths=paths, replace=replace)

    def remove(self, ids: list[str]) -> int:
        with self._lock.write():
            return self._gallery.remove(ids)

    def save(self) -> Path:
        with self._lock.write():
            return self._gallery.save()


class GalleryProxy:
    """The Gallery's public methods, each one call to the :class:`GalleryOwner` (whose errors,
    e.g. an unknown id, are raised here as themselves). Thread-safe; never call it on an event loop."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner  # the GalleryOwner's ActorHandle

    def _call(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(getattr(self._owner, method).remote(*args))
        except RayTaskError as exc:
            if isinstance(exc.cause, CompirError):
                raise exc.cause from None  # the owner's one-line message, not a remote traceback
            raise
        except RayActorError as exc:  # died mid-call, or restarting: Ray restarts it (max_restarts=-1), reloading the index
            if getattr(exc, "actor_init_failed", False):  # it could not open the index (e.g. another writer holds it)
                raise ContractError(f"the gallery owner could not open the index: {_remote_reason(exc)}") from None
            raise UnavailableError("the gallery owner (the process that holds the index) stopped and is being restarted; "
                                   f"retry shortly ({type(exc).__name__})", retry_after_s=OWNER_RETRY_AFTER_S) from None

    def __len__(self) -> int:
        return int(self._call("count"))

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and bool(self._call("contains", item_id))

    def present(self, ids: Sequence[str]) -> set[str]:
        return set(self._call("present", list(ids)))  # one call for every id

    @property
    def ids(self) -> list[str]:
        return list(self._call("item_ids"))

    def describe(self) -> dict[str, Any]:
        return dict(self._call("describe"))

    def image_path(self, item_id: str) -> Path | None:
        return self.image_paths([item_id])[0]

    def image_paths(self, ids: Sequence[str]) -> list[Path | None]:
        return cast("list[Path | None]", self._call("image_paths", list(ids)))

    def features_of(self, ids: Sequence[str]) -> np.ndarray:
        return np.asarray(self._call("features_of", list(ids)), dtype=np.float32)

    def search(self, queries: np.ndarray, *, k: int, exclude: Sequence[str | None] = ()) -> list[list[tuple[str, float]]]:
        return cast("list[list[tuple[str, float]]]", self._call("search", np.asarray(queries), k, list(exclude)))

    def store_image(self, data: bytes, *, suffix: str) -> str:
        return str(self._call("store_image", data, suffix))

    def add(self, ids: Sequence[str], *, embeds: np.ndarray, features: np.ndarray, paths: Sequence[str],
            replace: bool = True) -> None:
        self._call("add", list(ids), np.asarray(embeds), np.asarray(features), list(paths), replace)

    def remove(self, ids: Sequence[str]) -> int:
        return int(self._call("remove", list(ids)))

    def save(self) -> Path:
        return Path(self._call("save"))

    def close(self) -> None:
        """Nothing to release here: the owner holds the index's writer lock."""

    def as_gallery(self) -> Gallery:
        """This proxy where a Retriever expects a Gallery: it has every member a Retriever uses."""
        return cast("Gallery", self)


def _remote_reason(exc: Exception) -> str:
    """The last ``SomeError: message`` line of a remote traceback Ray wraps into ``exc``."""
    lines = [line.split("Error: ", 1)[1] for line in str(exc).splitlines() if "Error: " in line]
    return lines[-1].strip() if lines else type(exc).__name__


# ---- batching on Serve ----------------------------------------------------------------------------
class ServeBatcher(Generic[Item, Result]):
    """:class:`~compir.service.batcher.DynamicBatcher`'s interface on Ray Serve's ``@serve.batch``:
    searches submitted on the replica's event loop within ``wait_ms`` of each other (at most
    ``max_batch``) make one call of ``batch_fn``, on a worker thread; a failed batch is retried
    item by item as the DynamicBatcher does."""

    def __init__(self, batch_fn: Callable[[Sequence[Item]], Sequence[Result]], *, max_batch: int, wait_ms: float) -> None:
        _, serve = import_serve()
        self._batch_fn = batch_fn
        self._counter = BatchCounter()
        self._closed = False

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_ms / 1000.0)
        async def gathered(items: list[Item]) -> list[Result | Exception]:
            return await asyncio.get_running_loop().run_in_executor(None, run_batch, self._batch_fn, items, self._counter)

        self._gathered = gathered

    def submit(self, item: Item) -> Future[Result]:
        """Called on the replica's event loop (by the search route); the future resolves there."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        return asyncio.run_coroutine_threadsafe(self._answer(item), asyncio.get_running_loop())

    async def _answer(self, item: Item) -> Result:
        result = await self._gathered(item)
        if isinstance(result, Exception):
            raise result
        return cast(Result, result)

    def close(self) -> None:
        self._closed = True

    @property
    def alive(self) -> bool:
        return not self._closed

    def stats(self) -> BatchStats:
        return self._counter.stats()


# ---- the HTTP replicas ----------------------------------------------------------------------------
class ServiceReplica:
    """One HTTP replica: the export's encoders, a Retriever over the owner's gallery, the app."""

    def __init__(self, owner: Any, spec: RaySpec) -> None:
        from compir.runtime.encoder import Encoder
        from compir.runtime.rerankers import load_reranker
        from compir.runtime.retriever import Retriever
        from compir.service.batcher import BatcherFactory, DynamicBatcher
        from compir.service.engine import ServiceEngine

        _, serve = import_serve()
        encoder = Encoder.from_export(Path(spec.export_dir), backend=spec.backend,
                                      providers=list(spec.providers) if spec.providers else None, variant=spec.variant,
                                      prompt_template=spec.prompt_template)
        config = spec.config
        if spec.batching_mode is not None:
            batching = resolve_batching(spec.batching_mode, backend_info=encoder.backend_info(),
                                        max_batch=config.batching.max_batch, wait_ms=config.batching.wait_ms)
            config = dataclasses.replace(config, batching=batching)
        retriever = Retriever(encoder, GalleryProxy(owner).as_gallery(), reranker=load_reranker(encoder))
        factory: BatcherFactory = ServeBatcher if config.batching.enabled else DynamicBatcher
        self.engine = ServiceEngine(retriever, config=config, batcher=factory)
        self.engine.warm_up()  # graphs, decoders and a search through the owner: the replica is ready once warm
        self.replica_id = str(serve.get_replica_context().replica_id.unique_id)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from compir.service.app import create_app

        app = create_app(self.engine)
        app.add_middleware(ReplicaHeader, replica_id=self.replica_id)
        return app


class ReplicaHeader:
    """Adds ``X-Compir-Replica: <replica id>`` to every response (which replica answered)."""

    def __init__(self, app: ASGIApp, *, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_marked if scope["type"] == "http" else send)


# ---- running ------------------------------------------------------------------------------------
def start_owner(spec: RaySpec) -> Any:
    """The GalleryOwner actor, its index loaded (or its ContractError raised here)."""
    ray, _ = import_serve()
    # Index operations only (light): no CPU reserved, the CPUs go to the replicas that encode.
    owner = ray.remote(GalleryOwner).options(name=OWNER, namespace=APP_NAME, num_cpus=0, max_concurrency=64,
                                             max_restarts=-1).remote(spec.export_dir, spec.index_dir)
    len(GalleryProxy(owner))  # waits for the load: a bad index fails here, before Serve starts
    return owner


def build_application(spec: RaySpec, owner: Any, *, gpus_per_replica: float = 0.0) -> Any:
    """The Serve application: ``spec.scale`` ServiceReplicas, each given the owner's handle."""
    _, serve = import_serve()
    replica = serve.deployment(serve.ingress()(ServiceReplica), name="ServiceReplica", max_ongoing_requests=64,
                               ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica}, **spec.scale.options())
    return replica.bind(owner, spec)


def start(spec: RaySpec, *, address: str = LOCAL, host: str = "127.0.0.1", port: int = 8000,
          num_cpus: int | None = None) -> str:
    """Connect to (or start, for ``address="local"``) a Ray, deploy the app, return its URL once
    every replica is up. :func:`stop` undeploys it."""
    ray, serve = import_serve()
    if not ray.is_initialized():
        join_ray(ray, address, num_cpus=num_cpus)
    # One GPU per replica where the cluster has GPUs and the encoders would use one.
    gpus = 1.0 if spec.wants_gpu and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    owner = start_owner(spec)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(spec, owner, gpus_per_replica=gpus), name=APP_NAME, route_prefix="/",
              logging_config={"enable_access_log": False})
    return f"http://{host}:{port}"


def owner_handle() -> Any:
    """The running application's GalleryOwner actor (for a driver-side Retriever: tests, tools)."""
    ray, _ = import_serve()
    return ray.get_actor(OWNER, namespace=APP_NAME)


def stop() -> None:
    """Undeploy the app, stop Serve and the owner, then disconnect from Ray (stopping a Ray that start() began)."""
    ray, serve = import_serve()
    if ray.is_initialized():
        serve.shutdown()
        try:
            ray.kill(owner_handle())
        except ValueError:  # no owner: start() failed before it
            pass
        ray.shutdown()


def serve_forever(spec: RaySpec, *, address: str, host: str, port: int) -> int:
    """``compir serve --ray``: deploy, print where, and keep serving until Ctrl-C or SIGTERM."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    try:
        url = start(spec, address=address, host=host, port=port)
        signal.signal(signal.SIGTERM, on_signal)  # after ray.init, which sets its own
        print(f"compir serve --ray: {spec.scale.describe()} on Ray ({address}), one gallery owner; {url}  "
              "(API docs at /docs)", file=sys.stderr, flush=True)
        while not stopping.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
