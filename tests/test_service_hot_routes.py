"""HotRoutes: the hot path's routes answered by their endpoint without FastAPI's router, under the
app's exception handlers; everything else passes through to the app."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from compir.errors import InputError
from compir.service.hot_routes import HotRoutes, hot_route


def _app() -> tuple[FastAPI, list[str]]:
    """An app whose POST /echo is hot; the list records each call of the endpoint, and whether FastAPI's
    router routed it (the router puts the endpoint it matched in the scope)."""
    seen: list[str] = []
    router = APIRouter()

    @router.post("/echo")
    async def echo(request: Request) -> Response:
        routed = "by the router" if "endpoint" in request.scope else "directly"
        seen.append(f"{routed}, route {request.scope['route'].path}")
        body = await request.body()
        if body == b"bad":
            raise InputError("bad body")
        return Response(body, media_type="text/plain")

    app = FastAPI()
    app.include_router(router)

    @app.exception_handler(InputError)
    async def on_input(_: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    app.add_middleware(HotRoutes, routes=[hot_route(app, router, "POST", "/echo")])
    return app, seen


def _send(app: FastAPI, method: str, path: str, *, body: bytes = b"", root_path: str = "") -> httpx.Response:
    async def one() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, content=body)

    return asyncio.run(one())


def test_a_hot_route_is_answered_by_its_endpoint_with_the_route_in_scope():
    app, seen = _app()
    response = _send(app, "POST", "/echo", body=b"hello")
    assert (response.status_code, response.text) == (200, "hello")
    assert seen == ["directly, route /echo"]


def test_its_errors_go_through_the_apps_exception_handlers():
    app, _ = _app()
    response = _send(app, "POST", "/echo", body=b"bad")
    assert response.status_code == 422 and response.json() == {"detail": "bad body"}


def test_under_a_root_path_the_hot_route_still_matches():
    app, seen = _app()
    response = _send(app, "POST", "/api/echo", body=b"mounted", root_path="/api")
    assert (response.status_code, response.text) == (200, "mounted")
    assert seen == ["directly, route /echo"]


def test_other_methods_and_paths_reach_fastapis_router():
    app, seen = _app()
    wrong_method = _send(app, "GET", "/echo")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    assert _send(app, "POST", "/echo/").status_code in (307, 404)  # FastAPI's redirect or not found, not the endpoint
    assert seen == []


def test_a_route_the_router_lacks_is_refused_at_build_time():
    app, _ = _app()
    with pytest.raises(ValueError, match="POST /nope: expected one route"):
        hot_route(app, APIRouter(), "POST", "/nope")
