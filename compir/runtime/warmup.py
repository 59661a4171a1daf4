"""Warm a :class:`~compir.runtime.retriever.Retriever` up before its first query.

What is cold in a freshly opened retriever (measured on the default model, 2-core AVX2 EPYC):

- Pillow registers its image decoders at the first ``Image.open`` of the process (its plugin
  modules are imported then): 20-30 ms on the first uploaded reference, 0.3 ms after;
- each onnxruntime session's first run (allocations, kernel selection): 1.2-3x a warm run;
- the index's first search: about 2x a warm one (more where a memory-mapped view pages in).

:func:`warm_up` pays all of these once, at open: one composed query from an uploaded PNG (decode,
preprocess, the image and text encoders, the composer, the index search), a JPEG decode (the
other common upload), and the re-ranker's graphs where one is loaded.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from compir.images import load_image

if TYPE_CHECKING:
    from compir.runtime.retriever import Retriever

WARM_UP_TEXT = "warm up"


@dataclass(frozen=True)
class WarmUp:
    """What :func:`warm_up` ran and what it cost."""

    stages: tuple[str, ...]  # the query stages that ran (search_detailed's timing names)
    reranked: bool  # the re-ranker ran too
    ms: float  # the whole warm-up, wall clock


def warm_up(retriever: Retriever) -> WarmUp:
    """Run every stage of a query once so that the first real one runs at warm speed; see the module docstring."""
    start = time.perf_counter()
    for image_format in ("JPEG", "PNG"):  # the query below decodes the PNG
        load_image(_image_bytes(image_format))
    result = retriever.search_detailed(reference_image=_image_bytes("PNG"), text=WARM_UP_TEXT, k=1,
                                       rerank=retriever.has_reranker)
    return WarmUp(stages=tuple(result.timings_ms), reranked="rerank" in result.timings_ms,
                  ms=(time.perf_counter() - start) * 1000.0)


def _image_bytes(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, format=image_format)
    return buffer.getvalue()
