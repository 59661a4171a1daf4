"""Search endpoints: composed search by upload or gallery id, text-only search, batch search."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from PIL import Image

from compir.errors import InputError
from compir.service.engine import SearchAnswer, SearchQuery, ServiceEngine
from compir.service.forms import Form, FormField, FormSpec
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
async def search(request: Request, form: Annotated[Form, Depends(SEARCH_FORM.read)]) -> SearchOut:
    """Composed search: a reference (upload or gallery id) plus a modification text.

    Without a reference it is a text-only search. Takes multipart/form-data (or an urlencoded
    form without the upload); any other field is a 422."""
    engine: ServiceEngine = request.app.state.engine
    limits = engine.config.limits
    text, k, reference_id = form.text("text") or "", form.integer("k"), form.text("reference_id")
    check_k(k, limits)
    check_text(text, limits)
    engine.check_text(text)
    reference = form.upload("reference")
    if reference is not None and reference_id is not None:
        raise InputError("give either an uploaded reference or reference_id, not both")
    image: Image.Image | None = None
    if reference is not None:
        data = check_bytes(reference.data, limits, field="reference")
        image = await in_executor(request.app.state.executor, decode_image, data, limits, field="reference")
    query = SearchQuery(text=text, k=k, reference_image=image, reference_id=reference_id, rerank=form.flag("rerank"))
    return _to_out(await _answer(request, query))


@router.post("/search/text", response_model=SearchOut, dependencies=[Depends(require_json)],
             responses=errors(401, 413, 415, 422))
async def search_text(request: Request, body: TextSearchIn) -> SearchOut:
    """Text-to-image search: the gallery images that match a description."""
    engine: ServiceEngine = request.app.state.engine
    query = SearchQuery(text=check_text(body.text, engine.config.limits), k=check_k(body.k, engine.config.limits))
    engine.check_text(query.text)
    return _to_out(await _answer(request, query))


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


async def _answer(request: Request, query: SearchQuery) -> SearchAnswer:
    engine: ServiceEngine = request.app.state.engine
    executor = request.app.state.executor
    if not engine.batches(query):
        return await in_executor(executor, engine.search, query)
    # Unknown ids are refused before queueing, so a bad query never costs a batch its speed-up.
    await in_executor(executor, engine.check_reference, query.reference_id)
    return await asyncio.wrap_future(engine.submit(query))


def _to_out(answer: SearchAnswer) -> SearchOut:
    return SearchOut(
        hits=[HitOut(item_id=h.item_id, score=h.score) for h in answer.hits],
        timings_ms=answer.timings_ms,
        batch_size=answer.batch_size,
    )
