"""Search endpoints: composed search by upload or gallery id, text-only search, batch search.

``POST /search`` and ``POST /search/text`` are the hot path: each takes one trip to a worker
thread (the upload's decode and the search together) and answers with bytes that orjson encodes
from the hits, in the shape of :class:`SearchOut` (the schema the docs show)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import orjson
from fastapi import APIRouter, Depends, Request, Response
from PIL import Image

from compir.errors import InputError
from compir.service.config import Limits
from compir.service.engine import SearchAnswer, SearchQuery, ServiceEngine
from compir.service.forms import FormField, FormSpec
from compir.service.inputs import check_bytes, check_count, check_k, check_text, decode_b64, decode_image, in_executor, require_json
from compir.service.schemas import BatchSearchIn, BatchSearchOut, HitOut, SearchOut, TextSearchIn, errors

router = APIRouter(tags=["search"])

SEARCH_FORM = FormSpec(
    FormField("text", "text", "the modification text", default="", blank_ok=True),
    FormField("k", "integer", "how many results (decimal digits)", default=10),
    FormField("rerank", "boolean", "re-order the top results with the export's re-ranker (true or false)", default=False),
    FormField("reference", "file", "the reference image"),
    FormField("reference_id", "text", "or a gallery item id as the reference"),
)


@router.post("/search", response_model=SearchOut, openapi_extra=SEARCH_FORM.openapi(),
             responses=errors(400, 401, 404, 413, 415, 422))
async def search(request: Request) -> Response:
    """Composed search: a reference (upload or gallery id) plus a modification text.

    Without a reference it is a text-only search. Takes multipart/form-data (or an urlencoded
    form without the upload); any other field is a 422."""
    # The form is read here rather than as a FastAPI dependency: the same checks without the
    # per-request dependency machinery (the form's schema is the route's openapi_extra).
    form = await SEARCH_FORM.read(request)
    engine: ServiceEngine = request.app.state.engine
    limits = engine.config.limits
    text, k, reference_id = form.text("text") or "", form.integer("k"), form.text("reference_id")
    check_k(k, limits)
    check_text(text, limits)
    engine.check_text(text)
    reference = form.upload("reference")
    if reference is not None and reference_id is not None:
        raise InputError("give either an uploaded reference or reference_id, not both")
    upload = None if reference is None else check_bytes(reference.data, limits, field="reference")
    query = SearchQuery(text=text, k=k, reference_id=reference_id, rerank=form.flag("rerank"))
    return _json(await _answer(request, query, upload=upload))


@router.post("/search/text", response_model=SearchOut, dependencies=[Depends(require_json)],
             responses=errors(401, 413, 415, 422))
async def search_text(request: Request, body: TextSearchIn) -> Response:
    """Text-to-image search: the gallery images that match a description."""
    engine: ServiceEngine = request.app.state.engine
    query = SearchQuery(text=check_text(body.text, engine.config.limits), k=check_k(body.k, engine.config.limits))
    engine.check_text(query.text)
    return _json(await _answer(request, query))


@router.post("/search/batch", response_model=BatchSearchOut, dependencies=[Depends(require_json)],
             responses=errors(401, 404, 413, 415, 422))
async def search_batch(request: Request, body: BatchSearchIn) -> BatchSearchOut:
    """Many queries in one request, answered with one batched model call."""
    engine: ServiceEngine = request.app.state.engine
    limits = engine.config.limits
    check_k(body.k, limits)
    check_count(len(body.queries), limits, what="queries")
    queries = []
    for i, item in enumerate(body.queries):
        field = f"queries[{i}]"
        check_text(item.text, limits, field=f"{field}.text")
        engine.check_text(item.text, where=f"{field}.")
        if item.reference_id is not None and item.reference_image_b64 is not None:
            raise InputError(f"{field}: give either reference_id or reference_image_b64, not both")
        for name in ("reference_id", "reference_image_b64"):
            if getattr(item, name) == "":
                raise InputError(f"{field}.{name} is empty; omit it for a text-only query")
        image: Image.Image | None = None
        if item.reference_image_b64 is not None:
            data = decode_b64(item.reference_image_b64, limits, field=f"{field}.reference_image_b64")
            image = await in_executor(request.app.state.executor, decode_image, data, limits, field=field)
        queries.append(SearchQuery(text=item.text, k=body.k, reference_image=image, reference_id=item.reference_id))
    results = await in_executor(request.app.state.executor, engine.search_many, queries)
    return BatchSearchOut(results=[[HitOut(item_id=h.item_id, score=h.score) for h in hits] for hits in results])


async def _answer(request: Request, query: SearchQuery, *, upload: bytes | None = None) -> SearchAnswer:
    """``query``'s answer, ``upload`` (an image file's bytes) decoded as its reference image, in
    one worker-thread call: each trip from the event loop to a thread and back adds to every request's latency."""
    engine: ServiceEngine = request.app.state.engine
    limits = engine.config.limits
    if not engine.batches(query):
        return await in_executor(request.app.state.executor, lambda: engine.search(_decoded(query, upload, limits)))

    def checked() -> SearchQuery:
        ready = _decoded(query, upload, limits)
        # Unknown ids are refused before queueing, so a bad query never costs a batch its speed-up.
        engine.check_reference(ready.reference_id)
        return ready

    if engine.submits_on_loop:  # Ray Serve's batch queue lives on this loop: a second trip, back here
        return await asyncio.wrap_future(engine.submit(await in_executor(request.app.state.executor, checked)))
    return await asyncio.wrap_future(await in_executor(request.app.state.executor, lambda: engine.submit(checked())))


def _decoded(query: SearchQuery, upload: bytes | None, limits: Limits) -> SearchQuery:
    """``query`` with ``upload`` decoded as its reference image (a worker thread's job)."""
    return query if upload is None else replace(query, reference_image=decode_image(upload, limits, field="reference"))


def search_json(answer: SearchAnswer) -> bytes:
    """The :class:`SearchOut` body of ``answer``, encoded by orjson without building the model."""
    body = {"hits": [{"item_id": h.item_id, "score": float(h.score)} for h in answer.hits],
            "timings_ms": answer.timings_ms, "batch_size": answer.batch_size}
    return orjson.dumps(body)


def _json(answer: SearchAnswer) -> Response:
    return Response(search_json(answer), media_type="application/json")
