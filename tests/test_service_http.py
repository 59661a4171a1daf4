"""The HTTP layer's hot path: how uvicorn runs, one worker-thread trip per search, and the search
answers' JSON (encoded by orjson) in exactly :class:`SearchOut`'s shape."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from compir.data.load import load_split
from compir.runtime.retriever import Retriever
from compir.service.app import create_app
from compir.service.cli import main as serve_main
from compir.service.config import BatchingConfig, ServiceConfig
from compir.service.engine import ServiceEngine
from compir.service.schemas import SearchOut
from compir.service.server import BackgroundServer, uvicorn_options
from tests.fixtures.export import UNSET_SPINS, allow_spinning
from tests.fixtures.service import free_port, png_bytes


class _CountingExecutor(ThreadPoolExecutor):
    """A real thread pool that counts the calls handed to it (each one trip from the event loop)."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.trips = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.trips += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def retriever(tiny_export: Path, tiny_index: Path) -> Retriever:
    return Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])


@pytest.fixture(scope="module")
def url(retriever: Retriever) -> Iterator[str]:
    with BackgroundServer(create_app(ServiceEngine(retriever, config=ServiceConfig(batching=BatchingConfig(enabled=False))))) as server:
        yield server.url


def test_uvicorn_runs_uvloop_and_httptools_and_formats_no_access_line_it_would_drop():
    config = uvicorn.Config(FastAPI(), **uvicorn_options("warning"))
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    factory = config.get_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
    assert uvicorn_options("warning")["access_log"] is False
    assert uvicorn_options("info")["access_log"] is True  # where the access log shows, it stays on
    with pytest.raises(ValueError, match="unknown log level"):
        uvicorn_options("loud")


@pytest.mark.parametrize(("flags", "sleeps"), [((), True), (("--ort-spinning", "on"), False)], ids=["default", "spinning-on"])
def test_compir_serve_starts_uvicorn_with_those_options(tiny_export, tiny_index, tmp_path, monkeypatch, flags, sleeps):
    index = tmp_path / "index"
    shutil.copytree(tiny_index, index)
    started: dict[str, Any] = {}
    # uvicorn.run would serve until killed: record what compir serve hands it instead.
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(options, app=app))
    assert serve_main([str(tiny_export), str(index), "--port", str(free_port()), "--log-level", "warning", *flags]) == 0
    assert {k: started[k] for k in ("loop", "http", "access_log")} == {"loop": "uvloop", "http": "httptools", "access_log": False}
    engine = started["app"].state.engine
    # onnxruntime's own report: by default the pool threads sleep between requests (the loop shares the cores)
    session = engine.retriever.encoder.backend._sessions["image_encoder"]._session
    assert allow_spinning(session) == ("0" if sleeps else UNSET_SPINS)
    engine.close()


@pytest.mark.parametrize("batching", [False, True], ids=["batching-off", "batching-on"])
def test_a_search_takes_one_worker_thread_trip(retriever, synth_data, batching):
    app = create_app(ServiceEngine(retriever, config=ServiceConfig(batching=BatchingConfig(enabled=batching, wait_ms=1))))
    app.state.executor = executor = _CountingExecutor()
    query = load_split(synth_data, split="test").queries[0]
    upload = (synth_data / "images" / f"{query.reference}.png").read_bytes()
    try:
        with BackgroundServer(app) as server:
            for form, files in (({"text": query.text}, {"reference": ("ref.png", upload, "image/png")}),
                                ({"text": query.text, "reference_id": query.reference}, None)):
                before = executor.trips
                response = httpx.post(server.url + "/search", data=form, files=files)
                assert response.status_code == 200, response.text
                assert executor.trips - before == 1  # decode + search (or decode + check + queue) in one call
            before = executor.trips
            assert httpx.post(server.url + "/search/text", json={"text": query.text}).status_code == 200
            assert executor.trips - before == 1
    finally:
        executor.shutdown()


def test_search_answers_are_search_out_json(url, synth_data):
    query = load_split(synth_data, split="test").queries[0]
    answers = [
        httpx.post(url + "/search", data={"text": query.text, "k": "4"}, files={"reference": ("ref.png", png_bytes(), "image/png")}),
        httpx.post(url + "/search", data={"text": query.text, "reference_id": query.reference, "k": "4"}),
        httpx.post(url + "/search/text", json={"text": query.text, "k": 4}),
    ]
    for response in answers:
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        body = response.json()
        assert list(body) == ["hits", "timings_ms", "batch_size"]
        assert SearchOut.model_validate(body).model_dump(mode="json") == body  # the schema's shape, nothing more or less
        assert len(body["hits"]) == 4 and all(list(hit) == ["item_id", "score"] for hit in body["hits"])
        assert body["batch_size"] == 1 and body["timings_ms"] and all(isinstance(v, float) for v in body["timings_ms"].values())


def test_search_schema_is_the_form_and_search_out(url):
    operation = httpx.get(url + "/openapi.json").json()["paths"]["/search"]["post"]
    assert "parameters" not in operation  # the form is the body, nothing in the query string
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert list(form["properties"]) == ["text", "k", "rerank", "reference", "reference_id"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SearchOut"}
    assert {"400", "404", "413", "415", "422"} <= set(operation["responses"])
