"""Typed, torch-free view of a composed retrieval split, shared by training, evaluation and runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Query:
    """One composed query: reference image + modification text -> target image(s).

    ``targets`` holds every gallery name that counts as a hit (empty where labels are hidden,
    e.g. the CIRR test split). ``subset`` is CIRR's ``img_set.members`` (empty elsewhere).
    ``kind`` and ``unseen`` are set on the synthetic benchmark (modification kind; whether the
    target's attribute combination was held out of training), ``group`` names the FashionIQ
    category so metrics are reported per category.
    """

    query_id: str
    reference: str
    text: str
    targets: tuple[str, ...] = ()
    subset: tuple[str, ...] = ()
    kind: str = ""
    unseen: bool | None = None
    group: str = ""


@dataclass(frozen=True)
class CirSplit:
    """One split of a dataset: its queries, its gallery and where each image lies on disk.

    ``protocol`` selects the evaluation protocol: ``"cirr"``, ``"fashioniq"``, ``"shoes"`` or
    ``"synthetic"`` (CIRR's rules plus seen / unseen and per-kind breakdowns), or
    ``"fashioniq-val-queries"`` (TG-CIR's FashionIQ gallery, see :mod:`compir.metrics`).
    ``identities`` maps an image name to its object identity (MMRef); images absent from it
    are their own identity. ``captions`` maps an image name to descriptive texts where the
    dataset has them (synthetic scenes do), for text-to-image retrieval.
    """

    name: str
    protocol: str
    root: Path
    queries: tuple[Query, ...]
    gallery: tuple[str, ...]
    image_paths: dict[str, Path] = field(default_factory=dict)
    identities: dict[str, str] = field(default_factory=dict)
    captions: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def image_path(self, name: str) -> Path:
        if name in self.image_paths:
            return self.image_paths[name]
        raise KeyError(f"image {name!r} is not part of split {self.name!r}")

    def link_gallery(self, folder: Path) -> Path:
        """The gallery's images linked (not copied) into ``folder`` as ``<name><suffix>``, for what
        indexes a folder of images (``compir index build``); links already there are kept."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.gallery:
            source = self.image_path(name).resolve()
            link = folder / f"{name}{source.suffix}"
            if not link.exists():
                link.symlink_to(source)
        return folder
