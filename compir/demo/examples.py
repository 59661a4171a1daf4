"""Example queries for the demo, read from the synthetic benchmark the gallery came from, so a
newcomer gets a result in one click."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from compir.data.load import load_split
from compir.data.synthetic import is_synthetic
from compir.data.types import CirSplit
from compir.demo.session import DemoSession
from compir.errors import CompirError, InputError

SPLIT_PREFERENCE = ("test", "val", "train")


@dataclass(frozen=True)
class DemoExample:
    """``reference_id`` when the reference is in the gallery, else ``reference_path`` (an upload)."""

    text: str
    targets: tuple[str, ...]
    kind: str
    reference_id: str = ""
    reference_path: Path | None = None


def find_examples(session: DemoSession, *, data_dir: str | os.PathLike[str] | None = None, n: int = 4) -> list[DemoExample]:
    """Up to ``n`` queries (one per modification kind first) from ``data_dir`` or, when the
    gallery's images lie in a synthetic dataset, from that dataset. [] when there is none; an
    InputError when ``data_dir`` is named and holds no split with queries."""
    root = Path(data_dir) if data_dir is not None else dataset_root(session)
    if root is None:
        return []
    split = _best_split(root, session)
    if split is None and data_dir is not None:
        raise InputError(f"examples folder {root} holds no dataset split with queries ({', '.join(SPLIT_PREFERENCE)})")
    if split is None:
        return []
    chosen: list[DemoExample] = []
    seen: set[str] = set()  # kinds and references already shown
    for strict in (True, False):  # first: a new kind on a new reference each; then fill up
        for query in split.queries:
            if len(chosen) >= n:
                return chosen
            fresh = query.kind not in seen and query.reference not in seen
            if (strict and not fresh) or any(query.text == c.text for c in chosen):
                continue
            example = _example(session, split, query.reference, query.text, query.targets, query.kind)
            if example is not None:
                chosen.append(example)
                seen |= {query.kind, query.reference}
    return chosen


def dataset_root(session: DemoSession, *, probe: int = 8) -> Path | None:
    """The synthetic dataset folder above the first gallery images, if there is one."""
    for item_id in session.retriever.item_ids()[:probe]:
        path = session.image_path(item_id)
        for folder in path.resolve().parents if path is not None else ():
            if is_synthetic(folder):
                return folder
    return None


def _best_split(root: Path, session: DemoSession) -> CirSplit | None:
    # The split whose gallery the index holds best: its references are gallery items.
    ids = set(session.retriever.item_ids())
    best: tuple[int, CirSplit] | None = None
    for name in SPLIT_PREFERENCE:
        try:
            split = load_split(root, split=name)
        except CompirError:
            continue
        overlap = len(ids.intersection(split.gallery))
        if split.queries and (best is None or overlap > best[0]):
            best = (overlap, split)
    return best[1] if best else None


def _example(session: DemoSession, split: CirSplit, reference: str, text: str, targets: tuple[str, ...], kind: str) -> DemoExample | None:
    if session.contains(reference):
        return DemoExample(text=text, targets=targets, kind=kind, reference_id=reference)
    try:
        path = split.image_path(reference)
    except KeyError:
        return None
    return DemoExample(text=text, targets=targets, kind=kind, reference_path=path) if path.is_file() else None
