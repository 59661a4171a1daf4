"""NEUCORE's joint (reference, text, candidate) score at query time, from the export's
``reranker`` graph; the text's token states come from the export's text encoder graph, and the
graph's ``input_ids`` keep only the positions of the text's mined concepts (:mod:`compir.concepts`),
as in training (CLIP BPE: tokens counted per word; a Hugging Face tokenizer: its character offsets).
The text graph runs cut after the text where its sequence axis allows; the graph is given the
text's concept positions only (:func:`compir.concepts.pack_concepts`: the same scores as the full
length; an export before the graph's positions were dynamic takes them padded to its fixed count).
A NEUCORE trained with image regions reads them from the cached image features: an index built
from an export without them is refused by its encoder binding; an export whose image encoder
lacks them is refused here."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compir.concepts import concept_ids, concept_ids_from_offsets, pack_concepts
from compir.errors import ContractError
from compir.manifest import IMAGE_ENCODER, RERANKER, TEXT_ENCODER, ExportManifest
from compir.runtime.backends import GraphSession, open_backend
from compir.runtime.backends.base import numpy_dtype
from compir.runtime.encoder import fit_length, text_length
from compir.runtime.tokenizer import HfTokenizer

_TOKEN_CACHE = 256


class NeucoreStage:
    name = "neucore"

    def __init__(
        self, *, scorer: GraphSession, text: GraphSession, weight: float, concepts: Callable[[np.ndarray, str], np.ndarray],
        pad_id: int = 0,
    ) -> None:
        self.scorer = scorer
        self.text = text
        self.weight = float(weight)
        self.concepts = concepts  # (L,) ids of a text, the text -> the ids of its concept words only
        self.pad_id = pad_id  # the tokenizer's padding, where the text is cut
        self.text_length = text_length(text.spec)  # None: the text graph runs cut after the text
        self.slots, self.id_slots = (_fixed(scorer.spec.input(name).shape[1]) for name in ("token_features", "input_ids"))
        self._tokens: OrderedDict[bytes, np.ndarray] = OrderedDict()

    @classmethod
    def from_export(cls, encoder: Any, export_dir: Path, manifest: ExportManifest, variant: str, settings: dict[str, Any]) -> NeucoreStage:
        graphs = manifest.variant(variant).graphs
        if RERANKER not in graphs:
            raise ContractError(f"rerankers.json names NEUCORE but variant {variant!r} has no {RERANKER!r} graph; re-export")
        wanted = tuple(graphs[RERANKER].input("reference_features").shape[1:])
        cached = tuple(graphs[IMAGE_ENCODER].output("image_features").shape[1:])
        if wanted != cached:
            raise ContractError(f"export {export_dir}: the NEUCORE graph reads image features {wanted}, the image encoder gives "
                                f"{cached} (regions missing); export the checkpoint again with its NEUCORE sidecar, then rebuild the index")
        try:
            backend = encoder.backend
            scorer, text = backend.open(graphs[RERANKER]), backend.open(graphs[TEXT_ENCODER])
        except ContractError:
            # An engine backend built without the reranker graph: score on onnxruntime instead.
            backend = open_backend("onnxruntime", export_dir)
            scorer, text = backend.open(graphs[RERANKER]), backend.open(graphs[TEXT_ENCODER])
        tokenizer = encoder.tokenizer
        if isinstance(tokenizer, HfTokenizer):  # its tokens' character offsets, as in training
            hf = tokenizer

            def concepts(input_ids: np.ndarray, text: str) -> np.ndarray:
                return concept_ids_from_offsets(input_ids, *hf.offsets(text))
        else:  # CLIP BPE: tokens counted per word after the start token

            def concepts(input_ids: np.ndarray, text: str) -> np.ndarray:
                return concept_ids(input_ids, text, lambda piece: len(tokenizer.encode(piece)), first=1)

        return cls(scorer=scorer, text=text, weight=float(settings["weight"]), concepts=concepts, pad_id=tokenizer.spec.pad_id)

    def token_features(self, input_ids: np.ndarray) -> np.ndarray:
        """(L,) ids, fitted to the text graph (:meth:`fitted`) -> (L', Wt) token states (cached per text)."""
        key = input_ids.tobytes()
        if key not in self._tokens:
            feeds = {"input_ids": np.ascontiguousarray(input_ids[None], dtype=numpy_dtype(self.text.spec.input("input_ids").dtype))}
            self._tokens[key] = np.asarray(self.text.run(feeds, ("token_features",))["token_features"][0], dtype=np.float32)
            while len(self._tokens) > _TOKEN_CACHE:
                self._tokens.popitem(last=False)
        self._tokens.move_to_end(key)
        return self._tokens[key]

    def fitted(self, input_ids: np.ndarray) -> np.ndarray:
        """A text's (L,) ids as the text graph takes them: cut after the text where it can be."""
        return fit_length(np.asarray(input_ids)[None], length=self.text_length, pad_id=self.pad_id)[0]

    def scores(self, text: str, input_ids: np.ndarray, reference_features: np.ndarray, candidate_features: np.ndarray) -> np.ndarray:
        """One query (``text`` and its (L,) ids) against N candidates -> (N,) joint scores (the graph's batch axis is N)."""
        count = len(candidate_features)
        ids = self.fitted(input_ids)
        tokens, input_ids = pack_concepts(self.token_features(ids), self.concepts(ids, text), slots=self.slots, id_slots=self.id_slots)
        feeds = {
            "token_features": np.broadcast_to(tokens, (count, *tokens.shape)),
            "input_ids": np.broadcast_to(input_ids, (count, *input_ids.shape)),
            "reference_features": np.broadcast_to(reference_features, (count, *reference_features.shape)),
            "candidate_features": candidate_features,
        }
        typed = {k: np.ascontiguousarray(v, dtype=numpy_dtype(self.scorer.spec.input(k).dtype)) for k, v in feeds.items()}
        return np.asarray(self.scorer.run(typed, ("scores",))["scores"], dtype=np.float32).reshape(count)


def _fixed(axis: int | str | None) -> int | None:
    """A graph axis's fixed size, or None where it is dynamic."""
    return axis if isinstance(axis, int) else None
