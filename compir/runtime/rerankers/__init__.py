"""compir's stage-2 re-rankers (NEUCORE, MMRef), registered with :mod:`compir.runtime.rerank`,
and :func:`load_reranker`, which picks the re-ranker for an export among every registered one.

Importing this package registers the factory ``"methods"``: it reads the export's
``rerankers.json`` (written by :mod:`compir.export.rerankers`) and chains the stages whose
validation-chosen weight is not 0 (a weight of 0 means the method did not help on validation,
so it costs no latency either). Score of a candidate, with first-stage cosine ``s``::

    s1 = (1 - w_mmref) * s + w_mmref * ref_sim(q, c)        # MMRef, composed and text-only queries
    s2 = s1 + w_neucore * neucore(r, m, c)                   # NEUCORE, composed queries only

No torch here: numpy and the export's ONNX graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compir.manifest import ExportManifest
from compir.runtime.rerank import RerankCandidates, Reranker, RerankQuery, register_reranker, registered_rerankers
from compir.runtime.rerankers.mmref import MMRefStage
from compir.runtime.rerankers.neucore import NeucoreStage
from compir.runtime.rerankers.settings import pooled_vectors, reranker_settings

if TYPE_CHECKING:
    from compir.runtime.encoder import Encoder


class MethodsReranker:
    """MMRef refinement then NEUCORE's joint score (either may be absent)."""

    def __init__(self, *, mmref: MMRefStage | None, neucore: NeucoreStage | None, regions: bool = False) -> None:
        self.mmref = mmref
        self.neucore = neucore
        self.regions = regions  # the cached features are (K, D): the head's vector, then NEUCORE's image regions
        self.name = "+".join(stage.name for stage in (mmref, neucore) if stage is not None)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> np.ndarray:
        scores: np.ndarray = np.asarray(candidates.scores, dtype=np.float64)
        if self.mmref is not None:
            scores = self.mmref.refine(query.query_embeds, self.mmref_vectors(candidates.image_features), scores)
        if self.neucore is not None and query.reference_features is not None:
            joint = self.neucore.scores(query.text, query.input_ids, query.reference_features, candidates.image_features)
            scores = scores + self.neucore.weight * joint
        return scores.astype(np.float32)

    def mmref_vectors(self, image_features: np.ndarray) -> np.ndarray:
        """(N, D) the candidates' vectors MMRef refines: the head's vector where the cached features
        also carry NEUCORE's image regions."""
        return pooled_vectors(image_features[:, 0] if self.regions else image_features)


def load_methods_reranker(encoder: Encoder, manifest: ExportManifest, variant: str) -> Reranker | None:
    """The factory registered as ``"methods"``: None when the export has no useful stage-2 method."""
    settings = reranker_settings(encoder.export_dir, manifest)
    mmref = neucore = None
    if float(settings.get("mmref", {}).get("weight", 0.0)) > 0:
        mmref = MMRefStage.from_export(encoder.export_dir, manifest, settings["mmref"])
    if float(settings.get("neucore", {}).get("weight", 0.0)) > 0:
        neucore = NeucoreStage.from_export(encoder, encoder.export_dir, manifest, variant, settings["neucore"])
    if mmref is None and neucore is None:
        return None
    return MethodsReranker(mmref=mmref, neucore=neucore, regions=int(settings.get("neucore", {}).get("region_grid", 0)) > 0)


register_reranker("methods", load_methods_reranker)


def load_reranker(encoder: Encoder) -> Reranker | None:
    """The first registered reranker that applies to the encoder's export, or None."""
    for factory in registered_rerankers().values():
        reranker = factory(encoder, encoder.manifest, encoder.variant)
        if reranker is not None:
            return reranker
    return None
