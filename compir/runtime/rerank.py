"""Stage-2 re-ranking: a :class:`Reranker` re-scores the index's top-N for one query.

A composed query is first answered by cosine search over single gallery vectors; a scorer that
needs the candidate itself (NEUCORE's joint concept reasoning, MMRef's reference-space
similarity) cannot live in the ANN index, so it re-orders the top-N instead. To plug one in:

1. implement ``rerank(query, candidates) -> scores (N,)`` (higher = better);
2. register a factory: ``register_reranker("neucore", factory)``, where
   ``factory(encoder, manifest, variant) -> Reranker | None`` builds it from the export's
   ``reranker`` graph or its artifacts (``None`` = not applicable to this export);
3. :func:`compir.runtime.rerankers.load_reranker` (which registers compir's own re-rankers on
   import) tries every registered factory; the Retriever's ``has_reranker`` is True
   once one returns a reranker, and ``search(..., rerank=True)`` then re-orders the top
   ``top_n`` (default :data:`DEFAULT_TOP_N`) candidates.

This module is the interface only and imports no re-ranker: implementations import it, never
the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from compir.manifest import ExportManifest

if TYPE_CHECKING:
    from compir.runtime.encoder import Encoder

DEFAULT_TOP_N = 50


@dataclass(frozen=True)
class RerankQuery:
    """What the first stage knew about the query."""

    text: str
    input_ids: np.ndarray  # (L,) int64
    text_features: np.ndarray  # (*F,) head-defined
    reference_features: np.ndarray | None  # (*F,) image_features of the reference; None = text-only query
    query_embeds: np.ndarray  # (D,) the vector the index was searched with


@dataclass(frozen=True)
class RerankCandidates:
    """The first stage's top-N, best first."""

    item_ids: tuple[str, ...]
    image_features: np.ndarray  # (N, *F) cached gallery features
    image_paths: tuple[Path | None, ...]  # for scorers that need more than the cached features
    scores: np.ndarray  # (N,) first-stage cosine


class Reranker(Protocol):
    name: str

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> np.ndarray:
        """(N,) scores, higher is better; the candidates are re-ordered by them."""
        ...


RerankerFactory = Callable[["Encoder", ExportManifest, str], "Reranker | None"]
_FACTORIES: dict[str, RerankerFactory] = {}


def register_reranker(name: str, factory: RerankerFactory) -> None:
    """Make ``factory`` a candidate for :func:`compir.runtime.rerankers.load_reranker` (later names replace earlier ones)."""
    _FACTORIES[name] = factory


def registered_rerankers() -> dict[str, RerankerFactory]:
    """The registered factories by name, in registration order (a copy)."""
    return dict(_FACTORIES)
