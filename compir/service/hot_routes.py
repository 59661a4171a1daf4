"""The hot path's routes answered without FastAPI's router: ``POST /search`` straight to its endpoint.

FastAPI's router and per-route request handling cost several tenths of a millisecond of the event
loop's CPU per request (routing through several wrappers, dependency solving for a route that
declares none), on the thread that every request shares (docs/benchmarks.md, "HTTP API").
:class:`HotRoutes` sits just outside FastAPI's exception middleware and sends the hot routes to their
endpoint functions directly, as Starlette's ``request_response`` does: the same
:class:`~starlette.requests.Request`, the same endpoint, and its errors mapped by the app's own
exception handlers (the same 4xx bodies). Every other request, and the OpenAPI schema, go through
FastAPI as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.routing import APIRoute, APIRouter
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import request_response
from starlette.types import ASGIApp, Receive, Scope, Send


@dataclass(frozen=True)
class HotRoute:
    method: str
    path: str
    route: APIRoute  # put in the scope, as FastAPI's router does: the latency record names its path
    endpoint: ASGIApp  # the route's endpoint under the app's exception handlers


def hot_route(app: FastAPI, router: APIRouter, method: str, path: str) -> HotRoute:
    """``router``'s route for ``method path``, its endpoint run under ``app``'s exception handlers.
    ``router`` is included in ``app`` without a prefix; call this once ``app``'s exception handlers
    are all registered."""
    routes = [r for r in router.routes if isinstance(r, APIRoute) and r.path == path and method in (r.methods or ())]
    if len(routes) != 1:
        raise ValueError(f"{method} {path}: expected one route in the router, found {len(routes)}")
    handlers = {key: handler for key, handler in app.exception_handlers.items() if key not in (500, Exception)}
    return HotRoute(method, path, routes[0], ExceptionMiddleware(request_response(routes[0].endpoint), handlers=handlers))


class HotRoutes:
    """ASGI middleware: the requests of ``routes`` go to their endpoints, the rest to ``app``."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[HotRoute]) -> None:
        self.app = app
        self.routes = {(hot.method, hot.path): hot for hot in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.routes.get((str(scope.get("method")), _route_path(scope))) if scope["type"] == "http" else None
        if hot is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = hot.route
        await hot.endpoint(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the router matches: ``scope["path"]`` less the ``root_path`` a proxy mounts the app under."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path
