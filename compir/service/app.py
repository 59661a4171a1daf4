"""The FastAPI application: routes, error mapping, health / readiness / stats.

Every error a client can cause is a 4xx whose JSON ``detail`` is one sentence naming the
problem; only a fault of the server itself is a 500.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from compir import __version__
from compir.errors import ContractError, DuplicateItemError, InputError, UnavailableError
from compir.service.engine import ServiceEngine, UnknownItemError
from compir.service.hot_routes import HotRoutes, hot_route
from compir.service.inputs import LimitError, in_executor
from compir.service.middleware import API_KEY_HEADER, Gatekeeper, is_open
from compir.service.routes_gallery import router as gallery_router
from compir.service.routes_search import router as search_router
from compir.service.schemas import errors
from compir.service.stats import LatencyRecorder

log = logging.getLogger("compir.service")
_UNKNOWN_FIELD = "unknown field: this endpoint does not take it (see /docs for the fields it takes)"

DESCRIPTION = """Composed image retrieval over a compir export and index.

Send the API key (when the server has one) in the `X-API-Key` header (the Authorize button
here); `/health`, `/ready`, these docs and `/openapi.json` need none: they hold no data. Limits
(upload bytes, image pixels, text length, k, batch size) are listed by `GET /stats` and each
refusal names the limit it hit. Inputs are read strictly: an unknown or repeated field, an empty
value or a number written other than in decimal digits is refused, never reinterpreted."""


def create_app(engine: ServiceEngine) -> FastAPI:
    """An app serving ``engine``; the app closes the engine's batcher when it shuts down."""
    config = engine.config
    executor = ThreadPoolExecutor(max_workers=config.worker_threads, thread_name_prefix="compir-worker")
    recorder = LatencyRecorder()
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("compir serve: %s", config.describe())
        try:
            yield
        finally:
            engine.close()
            executor.shutdown(wait=False, cancel_futures=True)

    # Swagger UI and ReDoc from the package's own copies: /docs works on a box without internet.
    app = FastAPIOffline(title="compir", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.engine = engine
    app.state.executor = executor
    app.state.recorder = recorder
    app.include_router(search_router)
    app.include_router(gallery_router)
    _add_error_handlers(app)
    # Middleware added last runs first: the Gatekeeper (key, size cap, latency) sees every request.
    app.add_middleware(HotRoutes, routes=[hot_route(app, search_router, "POST", "/search")])
    app.add_middleware(
        Gatekeeper,
        recorder=recorder,
        api_key=config.api_key,
        max_request_bytes=config.limits.max_request_bytes,
    )

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready() -> JSONResponse:
        """Readiness: the index is loaded and the batcher runs (503 otherwise)."""
        if not engine.ready:
            return JSONResponse({"ready": False, "detail": "the search worker is not running"}, status_code=503)
        return JSONResponse({"ready": True, "count": await in_executor(executor, engine.count)})

    @app.get("/stats", tags=["ops"], responses=errors(401))
    async def stats() -> dict[str, Any]:
        """Gallery size, backend and providers, limits, batching, latency percentiles per endpoint."""
        info = await in_executor(executor, engine.describe)
        info["uptime_s"] = round(time.time() - started, 1)
        info["latency"] = [row.to_dict() for row in recorder.summary()]
        return info

    if config.api_key:
        _declare_api_key(app)
    return app


def _declare_api_key(app: FastAPI) -> None:
    """Tell the schema (and so Swagger UI's Authorize button) which operations need X-API-Key."""

    generate = app.openapi  # FastAPI's: builds the schema once and caches it on the app

    def openapi() -> dict[str, Any]:
        schema = generate()
        components = schema.setdefault("components", {})
        if "securitySchemes" not in components:
            components["securitySchemes"] = {"APIKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}}
            for path, operations in schema["paths"].items():
                for operation in operations.values() if not is_open(path) else ():
                    operation["security"] = [{"APIKey": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LimitError)
    async def on_limit(_: Request, exc: LimitError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(DuplicateItemError)
    async def on_duplicate(_: Request, exc: DuplicateItemError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(UnknownItemError)
    async def on_unknown(_: Request, exc: UnknownItemError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InputError)
    async def on_input(_: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ContractError)
    async def on_contract(_: Request, exc: ContractError) -> JSONResponse:
        log.error("server-side artifact problem: %s", exc)
        return JSONResponse({"detail": f"server error: {exc}"}, status_code=500)

    @app.exception_handler(UnavailableError)
    async def on_unavailable(_: Request, exc: UnavailableError) -> JSONResponse:
        log.warning("unavailable: %s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # One line per problem, "where: what", instead of pydantic's nested records.
        problems = ["{}: {}".format(".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body",
                                    _UNKNOWN_FIELD if err.get("type") == "extra_forbidden" else err.get("msg"))
                    for err in exc.errors()]
        return JSONResponse({"detail": "; ".join(problems), "errors": problems}, status_code=422)
