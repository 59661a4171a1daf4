"""The Retriever: composed (reference image + text) and text-only search over a gallery index.

Query rules (each violation is an :class:`~compir.errors.InputError` with a clear message):

- The reference is explicit: ``reference_image=`` (an image path, raw bytes or a PIL image) or
  ``reference_id=`` (a gallery item id: its cached image features are used, no decode, no image
  encode, and the item itself is left out of the hits, as in CIRR's protocol), never both;
  neither makes a text-only (text -> image) query. A path is never taken for an id, nor an id
  for a path.
- ``text`` must say something: text that the tokenizer reduces to no token (empty, whitespace,
  control characters, ``"\ufeff"``, ``"&nbsp;"``) is refused (a composed query without a
  modification is not a composed query); text longer than the model's context is truncated like
  open_clip; text over :data:`~compir.runtime.tokenizer.MAX_TEXT_CHARS` characters is refused.
- ``k`` must be an integer >= 1; a ``k`` larger than the gallery returns the whole gallery
  (clamped, never an error); an empty gallery returns no hits.
- ``rerank=True`` needs a configured re-ranker (:attr:`Retriever.has_reranker`).

On a zero-shot export (``encoder.zero_shot``) a composed query runs the token mapper on the reference's
image features (a gallery item's cached ones for ``reference_id=``) and the prompt encoder on the prompt
template filled with ``text``: the text cache cannot serve it (the prompt holds the reference's token).
Text-only queries use the text cache as on any export.

Thread-safe: encoders run concurrently, gallery reads and writes take a lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from compir.errors import InputError
from compir.images import ImageSource, load_image
from compir.runtime.encoder import Encoder, TextEncoding
from compir.runtime.gallery import Gallery, refuse_existing
from compir.runtime.rerank import DEFAULT_TOP_N, RerankCandidates, Reranker, RerankQuery
from compir.runtime.rerankers import load_reranker
from compir.runtime.tokenizer import MAX_TEXT_CHARS
from compir.runtime.types import AddResult, Hit, SearchResult
from compir.runtime.uploads import image_bytes, validate_item_id
from compir.runtime.warmup import WarmUp, warm_up

_QUERY_KEYS = {"text", "reference_image", "reference_id"}


@dataclass(frozen=True)
class _Text:
    input_ids: np.ndarray  # (L,)
    encoding: TextEncoding  # batch of one


class Retriever:
    """Search a gallery index with an export's encoders; see the module docstring for the rules."""

    def __init__(self, encoder: Encoder, gallery: Gallery, *, reranker: Reranker | None = None,
                 rerank_top_n: int = DEFAULT_TOP_N, text_cache_size: int = 1024) -> None:
        self.encoder = encoder
        self.gallery = gallery
        self.reranker = reranker
        self.rerank_top_n = rerank_top_n
        self._lock = threading.RLock()
        self._texts: OrderedDict[str, _Text] = OrderedDict()
        self._text_cache_size = text_cache_size
        self.warmed_up: WarmUp | None = None  # what compir.runtime.warmup.warm_up ran (from_dirs runs it)

    @classmethod
    def from_dirs(cls, export_dir: str | os.PathLike[str], index_dir: str | os.PathLike[str], *, backend: str = "onnxruntime",
                  providers: Sequence[str] | None = None, variant: str | None = None, view: bool = False,
                  text_cache_size: int = 1024, writable: bool = False, prompt_template: str | None = None,
                  spinning: bool = False) -> Retriever:
        """Open an export folder and an index built with its image encoder (ContractError if it was
        built with another; see Gallery.load). ``view=True`` memory-maps a large index instead of reading it;
        ``text_cache_size=0`` encodes every query's text (e.g. to time it). ``writable=True`` takes the
        index's writer lock now (one writer per index; a ContractError names the holder); without it
        the lock is taken at the first gallery change. :meth:`close` releases it. ``prompt_template``: a zero-shot
        export's template for this retriever's queries (default: the export's; InputError with the reason when bad).
        ``spinning=True``: onnxruntime's idle pool threads spin instead of sleeping (see ``open_session``; slower where graphs share cores).
        Returns once warm (:func:`~compir.runtime.warmup.warm_up`: every graph, the index and the image decoders ran once)."""
        encoder = Encoder.from_export(Path(export_dir), backend=backend, providers=providers, variant=variant,
                                      prompt_template=prompt_template, spinning=spinning)
        gallery = Gallery.load(Path(index_dir), encoder=encoder.fingerprint, manifest_sha256=encoder.manifest_sha256, view=view,
                               writable=writable)
        retriever = cls(encoder, gallery, reranker=load_reranker(encoder), text_cache_size=text_cache_size)
        retriever.warmed_up = warm_up(retriever)  # ready means warm: the first query runs at the speed of the next
        return retriever

    # ---- introspection ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.gallery)

    def item_ids(self) -> list[str]:
        with self._lock:
            return list(self.gallery.ids)

    def present(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are gallery items, in one index lookup."""
        with self._lock:
            return self.gallery.present(ids)

    def item_image_path(self, item_id: str) -> Path | None:
        """Where the item's image lies (None if none was recorded); InputError for unknown ids."""
        with self._lock:
            return self.gallery.image_path(item_id)

    @property
    def backend_info(self) -> dict[str, Any]:
        return {**self.encoder.backend_info(), **self.gallery.describe()}

    @property
    def has_reranker(self) -> bool:
        return self.reranker is not None

    # ---- search ----------------------------------------------------------------------------------
    def search(self, *, text: str, reference_image: ImageSource | None = None, reference_id: str | None = None,
               k: int = 10, rerank: bool = False) -> list[Hit]:
        """Hits, best first: composed with ``reference_image`` or ``reference_id``, text-only with neither."""
        return list(self.search_detailed(text=text, reference_image=reference_image, reference_id=reference_id,
                                         k=k, rerank=rerank).hits)

    def search_detailed(self, *, text: str, reference_image: ImageSource | None = None, reference_id: str | None = None,
                        k: int = 10, rerank: bool = False) -> SearchResult:
        """Hits, best first, and milliseconds per stage (only stages that ran)."""
        k = _check_k(k)
        self.check_text(text)
        _check_reference(reference_image, reference_id)
        if rerank and self.reranker is None:
            raise InputError("this export has no re-ranker; search with rerank=False")
        timings: dict[str, float] = {}
        item_id, features = self._reference_features(reference_image, reference_id, timings)
        cached: _Text | None = None
        if features is not None and self.encoder.zero_shot:  # no text cache: the prompt holds the reference's token
            query = self._prompt_query(features[None], text, timings)
        else:
            cached = self._encode_text(text, timings)
            if features is None:
                query = cached.encoding.text_embeds
            else:
                with _timed(timings, "compose"):
                    query = self.encoder.compose(features[None], cached.encoding.text_features)
        depth = max(k, self.rerank_top_n) if rerank else k
        with _timed(timings, "search"), self._lock:
            found = self.gallery.search(query, k=depth, exclude=[item_id])[0]
        if rerank and cached is not None:  # a zero-shot export has no re-ranker (refused above)
            with _timed(timings, "rerank"):
                found = self._rerank(text, cached, features, query[0], found)
        return SearchResult(hits=tuple(Hit(i, s) for i, s in found[:k]), timings_ms=timings)

    def search_batch(self, queries: Sequence[Mapping[str, Any]], *, k: int = 10) -> list[list[Hit]]:
        """Many queries ({"text": ..., "reference_image": ... or "reference_id": ...}, each reference
        optional) with batched encoders and one index search."""
        k = _check_k(k)
        for number, query in enumerate(queries):
            unknown = set(query) - _QUERY_KEYS
            if unknown or "text" not in query:
                raise InputError(f"query {number}: expected keys {sorted(_QUERY_KEYS)} (text required), got {sorted(query)}")
            self.check_text(query["text"], where=f"query {number}: ")
            _check_reference(query.get("reference_image"), query.get("reference_id"), where=f"query {number}: ")
        if not queries:
            return []
        resolved = self._batch_reference_features([(q.get("reference_image"), q.get("reference_id")) for q in queries])
        composed = [row for row, (_, feats) in enumerate(resolved) if feats is not None]
        # Zero-shot composed rows encode their prompt, not their text: only the others go through the text cache.
        by_prompt = set(composed) if self.encoder.zero_shot else set()
        encoded = [row for row in range(len(queries)) if row not in by_prompt]
        entries = dict(zip(encoded, self._batch_texts([queries[row]["text"] for row in encoded]), strict=True))
        vectors = np.zeros((len(queries), self.encoder.embed_dim), np.float32)  # (Q, D)
        for row, entry in entries.items():
            vectors[row] = entry.encoding.text_embeds[0]
        if composed:
            image_features = np.stack([feats for _, feats in resolved if feats is not None])  # rows in `composed` order
            text_features = None if self.encoder.zero_shot else np.concatenate([entries[row].encoding.text_features for row in composed])
            vectors[composed] = self.encoder.compose_texts(image_features, [queries[row]["text"] for row in composed],
                                                           text_features=text_features)
        with self._lock:
            found = self.gallery.search(vectors, k=k, exclude=[item for item, _ in resolved])
        return [[Hit(i, s) for i, s in hits] for hits in found]

    def check_text(self, text: object, *, where: str = "") -> None:
        """InputError unless ``text`` is a query text this retriever encodes (see the module docstring)."""
        if not isinstance(text, str):
            raise InputError(f"{where}text must be a string, got {type(text).__name__}")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"{where}text is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}")
        if self.encoder.tokenizer.is_blank(text):
            raise InputError(f"{where}text is empty (no token left once cleaned: {text[:20]!r}); "
                             "describe the modification (or the image, for a text-only query)")

    # ---- gallery changes ---------------------------------------------------------------------------
    def add_items(self, items: Mapping[str, ImageSource], *, replace: bool = False) -> AddResult:
        """Encode and add items; their images are copied into the index folder. An id already in the
        gallery is a DuplicateItemError (an InputError) naming it, nothing added, unless ``replace=True``;
        the result says which ids were new and which replaced."""
        ids = [validate_item_id(item_id) for item_id in items]
        if not replace:
            self._refuse_existing(ids)
        images = [load_image(source, name=item_id) for item_id, source in items.items()]
        encoded = self.encoder.encode_images(images)
        with self._lock:
            paths = []
            for source, image in zip(items.values(), images, strict=True):
                data, suffix = image_bytes(source, image)
                paths.append(self.gallery.store_image(data, suffix=suffix))
            held = self.gallery.present(ids) if replace else set()  # under the lock: what this add replaces
            # refused again inside the add: another writer may have added one meanwhile
            self.gallery.add(ids, embeds=encoded.image_embeds, features=encoded.image_features, paths=paths, replace=replace)
        return AddResult(added=tuple(i for i in ids if i not in held), replaced=tuple(i for i in ids if i in held))

    def _refuse_existing(self, ids: Sequence[str]) -> None:
        with self._lock:
            refuse_existing(self.gallery, ids)

    def remove_items(self, ids: Sequence[str]) -> int:
        """Remove items by id; unknown ids are an InputError and nothing is removed."""
        with self._lock:
            held = self.gallery.present(ids)
            unknown = [item for item in ids if item not in held]
            if unknown:
                raise InputError(f"unknown item id(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
            return self.gallery.remove(list(ids))

    def save(self) -> None:
        """Atomically write the index folder (a crash leaves the previous save intact)."""
        with self._lock:
            self.gallery.save()

    def close(self) -> None:
        """Release the index's writer lock, if held (searches still work)."""
        with self._lock:
            self.gallery.close()

    # ---- internals -------------------------------------------------------------------------------
    def _reference_features(self, reference_image: ImageSource | None, reference_id: str | None,
                            timings: dict[str, float]) -> tuple[str | None, np.ndarray | None]:
        """(gallery item id or None, image_features (*F,) or None for text-only); checked by _check_reference."""
        if reference_id is not None:
            with self._lock:
                try:  # one store lookup (a Milvus query or Ray call on those backends); an unknown id is an InputError
                    return reference_id, self.gallery.features_of([reference_id])[0]
                except InputError:
                    raise InputError(f"reference_id {reference_id!r}: no such item in the gallery") from None
        if reference_image is None:
            return None, None
        with _timed(timings, "decode"):
            image = load_image(reference_image)
        with _timed(timings, "preprocess"):
            pixels = self.encoder.preprocess([image])
        with _timed(timings, "image_encode"):
            features = self.encoder.encode_pixels(pixels).image_features[0]
        return None, features

    def _batch_reference_features(self, references: Sequence[tuple[ImageSource | None, str | None]]
                                  ) -> list[tuple[str | None, np.ndarray | None]]:
        """Like _reference_features for many (reference_image, reference_id) pairs; uploaded images
        are encoded in one batched call."""
        resolved: list[tuple[str | None, np.ndarray | None]] = []
        uploads: list[tuple[int, Image.Image]] = []
        for row, (reference_image, reference_id) in enumerate(references):
            if reference_image is None:
                resolved.append(self._reference_features(None, reference_id, {}))
            else:
                resolved.append((None, None))
                uploads.append((row, load_image(reference_image)))
        if uploads:
            features = self.encoder.encode_images([image for _, image in uploads]).image_features
            for (row, _), row_features in zip(uploads, features, strict=True):
                resolved[row] = (None, row_features)
        return resolved

    def _batch_texts(self, texts: Sequence[str]) -> list[_Text]:
        """Cached encodings of ``texts``; the ones not cached yet are encoded in one call."""
        with self._lock:
            missing = list(dict.fromkeys(text for text in texts if text not in self._texts))
        if missing:
            input_ids = self.encoder.tokenize(missing)
            encoding = self.encoder.encode_input_ids(input_ids)
            for row, text in enumerate(missing):
                self._remember(text, _Text(input_ids=input_ids[row], encoding=TextEncoding(
                    text_embeds=encoding.text_embeds[row : row + 1], text_features=encoding.text_features[row : row + 1])))
        with self._lock:
            # A text evicted meanwhile (a cache smaller than the batch) is encoded again, alone.
            entries = [self._texts.get(text) for text in texts]
        return [entry if entry is not None else self._encode_text(text, {}) for text, entry in zip(texts, entries, strict=True)]

    def _encode_text(self, text: str, timings: dict[str, float]) -> _Text:
        with self._lock:
            cached = self._texts.get(text)
            if cached is not None:
                self._texts.move_to_end(text)
                return cached
        with _timed(timings, "tokenize"):
            input_ids = self.encoder.tokenize([text])
        with _timed(timings, "text_encode"):
            encoding = self.encoder.encode_input_ids(input_ids)
        entry = _Text(input_ids=input_ids[0], encoding=encoding)
        self._remember(text, entry)
        return entry

    def _remember(self, text: str, entry: _Text) -> None:
        with self._lock:
            self._texts[text] = entry
            while len(self._texts) > self._text_cache_size:
                self._texts.popitem(last=False)

    def _prompt_query(self, image_features: np.ndarray, text: str, timings: dict[str, float]) -> np.ndarray:
        """Zero-shot: (1, E) reference features + the text -> (1, D) query: token mapper, then the prompt encoder."""
        with _timed(timings, "tokenize"):
            input_ids = self.encoder.prompt_ids([text])
        with _timed(timings, "token_map"):
            pseudo_tokens = self.encoder.map_image(image_features)
        with _timed(timings, "prompt_encode"):
            return self.encoder.encode_prompts(input_ids, pseudo_tokens)

    def _rerank(self, text: str, cached: _Text, features: np.ndarray | None, query: np.ndarray,
                found: list[tuple[str, float]]) -> list[tuple[str, float]]:
        assert self.reranker is not None
        top = found[: self.rerank_top_n]
        if not top:
            return found
        with self._lock:
            ids = [item for item, _ in top]
            candidates = RerankCandidates(
                item_ids=tuple(ids),
                image_features=self.gallery.features_of(ids),
                image_paths=tuple(self.gallery.image_paths(ids)),
                scores=np.asarray([s for _, s in top], dtype=np.float32),
            )
        context = RerankQuery(text=text, input_ids=cached.input_ids, text_features=cached.encoding.text_features[0],
                              reference_features=features, query_embeds=query)
        scores = np.asarray(self.reranker.rerank(context, candidates), dtype=np.float32).reshape(-1)
        if scores.shape[0] != len(top):
            raise RuntimeError(f"re-ranker {self.reranker.name!r} returned {scores.shape[0]} scores for {len(top)} candidates")
        order = np.argsort(-scores, kind="stable")
        return [(top[i][0], float(scores[i])) for i in order] + found[len(top):]


def _check_reference(reference_image: object, reference_id: object, *, where: str = "") -> None:
    """At most one reference, each of its kind; an InputError naming the argument otherwise."""
    if reference_image is not None and reference_id is not None:
        raise InputError(f"{where}give reference_image or reference_id, not both")
    if reference_id is not None and not isinstance(reference_id, str):
        raise InputError(f"{where}reference_id must be a gallery item id (a string), not {type(reference_id).__name__}")
    if reference_image is None:
        return
    if not isinstance(reference_image, (str, bytes, os.PathLike, Image.Image)):
        raise InputError(f"{where}reference_image must be a path, bytes or a PIL image, not {type(reference_image).__name__}")
    if isinstance(reference_image, (str, os.PathLike)) and not Path(reference_image).is_file():
        raise InputError(f"{where}reference_image {str(reference_image)!r} is not a file (for a gallery item use reference_id=)")


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0
