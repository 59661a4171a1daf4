"""Encode an evaluation split with an export folder (torch-free), for ``compir eval EXPORT_DIR``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from compir.data.types import CirSplit
from compir.images import load_image
from compir.runtime.encoder import Encoder


def encode_split_for_export(
    export_dir: str | Path,
    split: CirSplit,
    *,
    backend: str = "onnxruntime",
    variant: str | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(query_embeds (Q, D), gallery_embeds (G, D), gallery_names) for ``split``.

    Every image (gallery and references) is encoded once; query i composes the features of
    ``split.queries[i].reference`` with its text. Rows are L2-normalised by the graphs.
    """
    encoder = Encoder.from_export(export_dir, backend=backend, variant=variant)
    names = sorted(set(split.gallery) | {q.reference for q in split.queries})
    row = {name: i for i, name in enumerate(names)}
    embeds = np.zeros((len(names), encoder.embed_dim), np.float32)
    features = np.zeros((len(names), *encoder.feature_shape), np.float32)
    for start in tqdm(range(0, len(names), batch_size), desc="encoding images", unit="batch"):
        chunk = names[start : start + batch_size]
        encoded = encoder.encode_images([load_image(split.image_path(n), name=n) for n in chunk], batch_size=batch_size)
        embeds[start : start + len(chunk)] = encoded.image_embeds
        features[start : start + len(chunk)] = encoded.image_features
    queries = np.zeros((len(split.queries), encoder.embed_dim), np.float32)
    for start in tqdm(range(0, len(split.queries), batch_size), desc="encoding queries", unit="batch"):
        batch = split.queries[start : start + batch_size]
        texts = encoder.encode_texts([q.text for q in batch])
        refs = features[[row[q.reference] for q in batch]]
        queries[start : start + len(batch)] = encoder.compose(refs, texts.text_features)
    gallery_names = list(split.gallery)
    return queries, embeds[[row[n] for n in gallery_names]], gallery_names
