"""Search endpoints: composed search by upload or gallery id, text-only search, batch search."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from PIL import Image

from compir.errors import InputError
from compir.runtime.service.engine import SearchAnswer, SearchQuery, ServiceEngine
from compir.runtime.service.inputs import (
    check_count,
    check_k,
    check_text,
    decode_b64,
    decode_image,
    in_executor,
    read_upload,
    require_form,
    require_json,
)
from compir.runtime.service.schemas import BatchSearchIn, BatchSearchOut, HitOut, SearchOut, TextSearchIn

router = APIRouter(tags=["search"])


@router.post("/search", response_model=SearchOut, dependencies=[Depends(require_form)])
async def search(
    request: Request,
    text: str = Form("", description="the modification text"),
    k: int = Form(10, description="how many results"),
    rerank: bool = Form(False, description="re-order the top results with the export's re-ranker"),
    reference: UploadFile | None = File(None, description="the reference image"),
    reference_id: str | None = Form(None, description="or a gallery item id as the reference"),
) -> SearchOut:
    """Composed search: a reference (upload or gallery id) plus a modification text.

    Without a reference it is a text-only search."""
    engine: ServiceEngine = request.app.state.engine
    limits = engine.config.limits
    check_k(k, limits)
    check_text(text, limits)
    if reference is not None and reference_id:
        raise InputError("give either an uploaded reference or reference_id, not both")
    image: Image.Image | None = None
    if reference is not None:
        data = await read_upload(reference, limits, field="reference")
        image = await in_executor(request.app.state.executor, decode_image, data, limits, field="reference")
    query = SearchQuery(text=text, k=k, reference_image=image, reference_id=reference_id or None, rerank=rerank)
    return _to_out(await _answer(request, query))


@router.post("/search/text", response_model=SearchOut, dependencies=[Depends(require_json)])
async def search_text(request: Request, body: TextSearchIn) -> SearchOut:
    """Text-to-image search: the gallery images that match a description."""
    engine: ServiceEngine = request.app.state.engine
    query = SearchQuery(text=check_text(body.text, engine.config.limits), k=check_k(body.k, engine.config.limits))
    return _to_out(await _answer(request, query))


@router.post("/search/batch", response_model=BatchSearchOut, dependencies=[Depends(require_json)])
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
        if item.reference_id and item.reference_image_b64:
            raise InputError(f"{field}: give either reference_id or reference_image_b64, not both")
        image: Image.Image | None = None
        if item.reference_image_b64:
            data = decode_b64(item.reference_image_b64, limits, field=f"{field}.reference_image_b64")
            image = await in_executor(request.app.state.executor, decode_image, data, limits, field=field)
        queries.append(SearchQuery(text=item.text, k=body.k, reference_image=image, reference_id=item.reference_id or None))
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
