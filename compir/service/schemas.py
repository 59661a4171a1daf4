"""Request and response bodies of the HTTP API (they make up the OpenAPI schema).

Request bodies forbid fields they do not declare: a misspelt ``topk`` is a 422 naming it, never
silently ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

ERROR_STATUSES = {
    400: "malformed body: a multipart form cut short or not well formed, text that is not UTF-8",
    401: "missing or wrong X-API-Key",
    404: "an item id that is not in the gallery",
    409: "an item id already in the gallery (add with replace=true)",
    413: "over a size limit: request bytes, upload bytes, image pixels, files or queries in one request",
    415: "wrong content type (this endpoint takes another)",
    422: "an invalid value: unknown or repeated field, empty value, k out of range, an id outside the grammar, ...",
}


class ErrorOut(BaseModel):
    """Every 4xx: one sentence naming the problem (a 422 for invalid fields also lists each in ``errors``)."""

    detail: str
    errors: list[str] | None = Field(default=None, description="one line per invalid field (422 from body validation)")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the error statuses it can answer, each with the ErrorOut body."""
    return {status: {"model": ErrorOut, "description": ERROR_STATUSES[status]} for status in statuses}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HitOut(BaseModel):
    item_id: str
    score: float


class SearchOut(BaseModel):
    hits: list[HitOut]
    timings_ms: dict[str, float] = Field(description="per-stage milliseconds, or 'batch' when batched")
    batch_size: int = Field(description="queries that shared the model calls answering this one")


class TextSearchIn(_Body):
    text: str
    k: StrictInt = 10  # strict: true / 2.0 / "2" are refused, not read as an integer


class BatchQueryIn(_Body):
    text: str = ""
    reference_id: str | None = Field(default=None, description="a gallery item id")
    reference_image_b64: str | None = Field(default=None, description="an image file, base64-encoded")


class BatchSearchIn(_Body):
    queries: list[BatchQueryIn]
    k: StrictInt = 10


class BatchSearchOut(BaseModel):
    results: list[list[HitOut]]


class AddOut(BaseModel):
    added: list[str] = Field(description="ids new to the gallery")
    replaced: list[str] = Field(description="ids the gallery held, whose image this request replaced (replace=true)")
    count: int


class RemoveIn(_Body):
    ids: list[str]


class RemoveOut(BaseModel):
    removed: int
    count: int


class ItemsPage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[str]


class CountOut(BaseModel):
    count: int
