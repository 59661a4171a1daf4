"""``compir serve EXPORT INDEX --ray``: the service's own FastAPI app on Ray Serve replicas.

One Serve application, and for a usearch index or a Milvus Lite file one actor beside it:

- ``ServiceReplica`` (N replicas, or autoscaled): each opens the export's encoders and builds the
  app with :func:`compir.service.app.create_app` (same routes, limits, API key, error bodies)
  over a Retriever. Image decode, encode and compose (what costs) run here and scale with the
  replicas; with batching on (auto: GPU encoders), ``@serve.batch`` gathers concurrent searches
  into one encoder call.
- **A Milvus server** (an ``http(s)://``/``tcp://`` URI in index.json): each replica opens the
  gallery itself and queries and writes the collection directly, as separate ``compir serve``
  processes do; no process sits in the middle. A new id added through two replicas at once is
  one 200 and one 409: :mod:`compir.runtime.milvus_claims`. A server that is down is a 503
  with Retry-After, as without Ray.
- **usearch, Milvus Lite** (one file, one process): one Ray actor, the gallery owner
  (:mod:`compir.service.ray_owner`), holds the index and does every index operation; the
  replicas' Retrievers call it, so a write made through any replica is seen by all.

Ray is an optional extra, imported only here, inside the functions that need it.
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

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compir.errors import InputError
from compir.runtime.backends.providers import GPU_PROVIDERS, canonical_provider
from compir.runtime.ray_cluster import LOCAL, import_ray, join_ray
from compir.service.batcher import BatchCounter, BatchStats, Item, Result, run_batch
from compir.service.config import ServiceConfig, resolve_batching
from compir.service.ray_owner import APP_NAME, GalleryProxy, load_gallery, needs_owner, owner_handle, start_owner

if TYPE_CHECKING:
    from fastapi import FastAPI


REPLICA_HEADER = "x-compir-replica"  # which HTTP replica answered (responses from --ray only)


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
    spinning: bool = False  # onnxruntime's idle pool threads spin (see `compir serve --ort-spinning`)

    @property
    def wants_gpu(self) -> bool:
        """TensorRT, or onnxruntime asked for CUDA / TensorRT (its default, None, tries CUDA first)."""
        if self.backend == "tensorrt" or self.providers is None:
            return True
        return any(canonical_provider(p) in GPU_PROVIDERS for p in self.providers)


# ---- batching on Serve ----------------------------------------------------------------------------
class ServeBatcher(Generic[Item, Result]):
    """:class:`~compir.service.batcher.DynamicBatcher`'s interface on Ray Serve's ``@serve.batch``:
    searches submitted on the replica's event loop within ``wait_ms`` of each other (at most
    ``max_batch``) make one call of ``batch_fn``, on a worker thread; a failed batch is retried
    item by item as the DynamicBatcher does."""

    submit_on_loop = True

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
    """One HTTP replica: the export's encoders, a Retriever over the owner's gallery (``owner``) or,
    without one (a Milvus server), over the collection it opens itself, and the app."""

    def __init__(self, owner: Any | None, spec: RaySpec) -> None:
        from compir.runtime.encoder import Encoder
        from compir.runtime.rerankers import load_reranker
        from compir.runtime.retriever import Retriever
        from compir.service.batcher import BatcherFactory, DynamicBatcher
        from compir.service.engine import ServiceEngine

        _, serve = import_serve()
        encoder = Encoder.from_export(Path(spec.export_dir), backend=spec.backend,
                                      providers=list(spec.providers) if spec.providers else None, variant=spec.variant,
                                      prompt_template=spec.prompt_template, spinning=spec.spinning)
        config = spec.config
        if spec.batching_mode is not None:
            batching = resolve_batching(spec.batching_mode, backend_info=encoder.backend_info(),
                                        max_batch=config.batching.max_batch, wait_ms=config.batching.wait_ms)
            config = dataclasses.replace(config, batching=batching)
        gallery = GalleryProxy(owner).as_gallery() if owner is not None else load_gallery(spec.export_dir, spec.index_dir)
        retriever = Retriever(encoder, gallery, reranker=load_reranker(encoder))
        factory: BatcherFactory = ServeBatcher if config.batching.enabled else DynamicBatcher
        self.engine = ServiceEngine(retriever, config=config, batcher=factory)
        self.engine.warm_up()  # graphs, decoders and a search of the gallery: the replica is ready once warm
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
def build_application(spec: RaySpec, owner: Any | None, *, gpus_per_replica: float = 0.0) -> Any:
    """The Serve application: ``spec.scale`` ServiceReplicas, each given the owner's handle (None:
    each opens the Milvus server's collection itself)."""
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
    owner = start_owner(spec.export_dir, spec.index_dir) if needs_owner(spec.index_dir) else None
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(spec, owner, gpus_per_replica=gpus), name=APP_NAME, route_prefix="/",
              logging_config={"enable_access_log": False})
    return f"http://{host}:{port}"


def stop() -> None:
    """Undeploy the app, stop Serve and the owner, then disconnect from Ray (stopping a Ray that start() began)."""
    ray, serve = import_serve()
    if ray.is_initialized():
        serve.shutdown()
        try:
            ray.kill(owner_handle())
        except ValueError:  # no owner: a Milvus server's app, or start() failed before it
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
        gallery = "one gallery owner" if needs_owner(spec.index_dir) else "each opens the Milvus server's collection"
        print(f"compir serve --ray: {spec.scale.describe()} on Ray ({address}), {gallery}; {url}  "
              "(API docs at /docs)", file=sys.stderr, flush=True)
        while not stopping.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
