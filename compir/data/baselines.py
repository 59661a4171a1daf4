"""The raw-pixel image-only baseline: how far ranking by the reference image alone gets.

Used by the synthetic benchmark's hardness gate (a test and ``compir bench synth``): on the test
split it must stay low (R@1 <= 20 %), or the benchmark does not need the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from compir.data.types import CirSplit
from compir.images import load_image
from compir.metrics import EvalReport, evaluate_split


def raw_pixels(split: CirSplit, names: Sequence[str]) -> np.ndarray:
    """(N, H*W*3) float32: the decoded pixels of ``names``, flattened."""
    return np.stack([np.asarray(load_image(split.image_path(name)), dtype=np.float32).ravel() for name in names])


def _normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def image_only_pixel_report(split: CirSplit) -> EvalReport:
    """Evaluate ``split`` with each query's reference pixels as its query embedding.

    Pixels are centred on the gallery mean first (cosine of raw pixels is dominated by the
    shared background); gallery items are their centred pixels too.
    """
    names = list(split.gallery)
    pixels = raw_pixels(split, names)
    mean = pixels.mean(axis=0)
    gallery = _normalise(pixels - mean)
    row = {name: i for i, name in enumerate(names)}
    outside = list(dict.fromkeys(q.reference for q in split.queries if q.reference not in row))
    extra = _normalise(raw_pixels(split, outside) - mean) if outside else gallery[:0]
    extra_row = {name: i for i, name in enumerate(outside)}
    queries = np.stack(
        [gallery[row[q.reference]] if q.reference in row else extra[extra_row[q.reference]] for q in split.queries]
    )
    return evaluate_split(split, query_embeds=queries, gallery_embeds=gallery, gallery_names=names)
