"""Encode an evaluation split through the runtime (torch-free): ``compir eval EXPORT_DIR`` and the
export's per-variant accuracy both measure the path users run (numpy preprocessing, the runtime's
tokenizer, image encoder + text encoder + composer, or a zero-shot export's token mapper + prompt encoder, as
:class:`~compir.runtime.retriever.Retriever` does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from compir.data.types import CirSplit
from compir.errors import ContractError
from compir.images import load_image
from compir.runtime.encoder import Encoder


@dataclass(frozen=True)
class SplitEncoding:
    """Rows of ``query_embeds`` follow ``split.queries``, rows of ``gallery_embeds`` ``gallery_names``."""

    query_embeds: np.ndarray  # (Q, D) unit vectors
    gallery_embeds: np.ndarray  # (G, D) unit vectors
    gallery_names: list[str]


def encode_split(
    encoders: Mapping[str, Encoder], split: CirSplit, *, batch_size: int = 64, progress: bool = True
) -> dict[str, SplitEncoding]:
    """Gallery and composed-query embeddings of ``split`` through each encoder (e.g. one per variant).

    Every image (gallery and references) is decoded and preprocessed once and encoded by every
    encoder; query i composes the features of ``split.queries[i].reference`` with its text.
    """
    first = next(iter(encoders.values()))
    for name, encoder in encoders.items():
        if encoder.manifest.preprocess != first.manifest.preprocess or encoder.manifest.tokenizer != first.manifest.tokenizer:
            raise ContractError(f"encoder {name!r} preprocesses or tokenizes differently from the others; encode it separately")
    names = sorted(set(split.gallery) | {q.reference for q in split.queries})
    row = {name: i for i, name in enumerate(names)}
    embeds = {name: np.zeros((len(names), e.embed_dim), np.float32) for name, e in encoders.items()}
    features = {name: np.zeros((len(names), *e.feature_shape), np.float32) for name, e in encoders.items()}
    for start in tqdm(range(0, len(names), batch_size), desc="encoding images", unit="batch", disable=not progress):
        chunk = names[start : start + batch_size]
        pixels = first.preprocess([load_image(split.image_path(n), name=n) for n in chunk])
        for name, encoder in encoders.items():
            encoded = encoder.encode_pixels(pixels)
            embeds[name][start : start + len(chunk)] = encoded.image_embeds
            features[name][start : start + len(chunk)] = encoded.image_features
    queries = {name: np.zeros((len(split.queries), e.embed_dim), np.float32) for name, e in encoders.items()}
    for start in tqdm(range(0, len(split.queries), batch_size), desc="encoding queries", unit="batch", disable=not progress):
        batch = split.queries[start : start + batch_size]
        texts = [q.text for q in batch]
        input_ids = first.tokenize(texts)
        rows = [row[q.reference] for q in batch]
        for name, encoder in encoders.items():
            # a zero-shot encoder reads the texts in its prompt template instead (token mapper + prompt encoder)
            text_features = None if encoder.zero_shot else encoder.encode_input_ids(input_ids).text_features
            queries[name][start : start + len(batch)] = encoder.compose_texts(features[name][rows], texts, text_features=text_features)
    gallery_names = list(split.gallery)
    gallery_rows = [row[n] for n in gallery_names]
    return {name: SplitEncoding(queries[name], embeds[name][gallery_rows], gallery_names) for name in encoders}


def encode_split_for_export(
    export_dir: str | Path,
    split: CirSplit,
    *,
    backend: str = "onnxruntime",
    variant: str | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(query_embeds (Q, D), gallery_embeds (G, D), gallery_names) of ``split`` through one variant."""
    encoder = Encoder.from_export(export_dir, backend=backend, variant=variant)
    encoded = encode_split({"export": encoder}, split, batch_size=batch_size)["export"]
    return encoded.query_embeds, encoded.gallery_embeds, encoded.gallery_names
