"""Values the runtime hands to its callers (service, demo, CLI): frozen, typed, torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

# Stage names of SearchResult.timings_ms, in query order.
# token_map and prompt_encode: a zero-shot export's composition (its tokenize is the prompt's).
# Why a zero-shot export's composed queries never come from the text cache (CLI --timings, the demo's latency line).
ZERO_SHOT_CACHE_NOTE = "the prompt holds the reference's token, so each composed query runs the token mapper and one prompt encode"
STAGES = ("decode", "preprocess", "image_encode", "tokenize", "text_encode", "token_map", "prompt_encode", "compose", "search", "rerank")


@dataclass(frozen=True)
class Hit:
    """One retrieved gallery item; ``score`` is the cosine similarity (or the re-ranker's score)."""

    item_id: str
    score: float


@dataclass(frozen=True)
class AddResult:
    """What an add did, in request order: ids new to the gallery, and ids it held whose image and
    vectors the add replaced (only with ``replace=True``)."""

    added: tuple[str, ...]
    replaced: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchResult:
    """Hits, best first, and the milliseconds spent in each stage that ran (keys from STAGES)."""

    hits: tuple[Hit, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)
