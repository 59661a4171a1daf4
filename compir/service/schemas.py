"""Request and response bodies of the HTTP API (they make up the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, Field, StrictInt


class HitOut(BaseModel):
    item_id: str
    score: float


class SearchOut(BaseModel):
    hits: list[HitOut]
    timings_ms: dict[str, float] = Field(description="per-stage milliseconds, or 'batch' when batched")
    batch_size: int = Field(description="queries that shared the model calls answering this one")


class TextSearchIn(BaseModel):
    text: str
    k: StrictInt = 10  # strict: true / 2.0 / "2" are refused, not read as an integer


class BatchQueryIn(BaseModel):
    text: str = ""
    reference_id: str | None = Field(default=None, description="a gallery item id")
    reference_image_b64: str | None = Field(default=None, description="an image file, base64-encoded")


class BatchSearchIn(BaseModel):
    queries: list[BatchQueryIn]
    k: StrictInt = 10


class BatchSearchOut(BaseModel):
    results: list[list[HitOut]]


class AddOut(BaseModel):
    added: list[str] = Field(description="ids new to the gallery")
    replaced: list[str] = Field(description="ids the gallery held, whose image this request replaced (replace=true)")
    count: int


class RemoveIn(BaseModel):
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
