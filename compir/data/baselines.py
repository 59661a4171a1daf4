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


def pixel_embeds(split: CirSplit, names: Sequence[str], *, mean: np.ndarray | None = None) -> np.ndarray:
    """(N, H*W*3) float32 raw pixels of ``names``, minus ``mean`` (if given), L2-normalised."""
    pixels = np.stack([np.asarray(load_image(split.image_path(name)), dtype=np.float32).ravel() for name in names])
    if mean is not None:
        pixels -= mean
    norms = np.linalg.norm(pixels, axis=1, keepdims=True)
    return pixels / np.maximum(norms, 1e-12)


def image_only_pixel_report(split: CirSplit) -> EvalReport:
    """Evaluate ``split`` with each query's reference pixels as its query embedding.

    Pixels are centred on the gallery mean first (cosine of raw pixels is dominated by the
    shared background).
    """
    names = list(split.gallery)
    raw = np.stack([np.asarray(load_image(split.image_path(name)), dtype=np.float32).ravel() for name in names])
    mean = raw.mean(axis=0)
    centred = raw - mean
    gallery = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
    row = {name: i for i, name in enumerate(names)}
    missing = [q.reference for q in split.queries if q.reference not in row]
    extra = pixel_embeds(split, list(dict.fromkeys(missing)), mean=mean) if missing else np.zeros((0, gallery.shape[1]))
    extra_row = {name: i for i, name in enumerate(dict.fromkeys(missing))}
    queries = np.stack(
        [gallery[row[q.reference]] if q.reference in row else extra[extra_row[q.reference]] for q in split.queries]
    )
    return evaluate_split(split, query_embeds=queries, gallery_embeds=gallery, gallery_names=names)
