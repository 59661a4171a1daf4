"""FashionIQ reader (Wu et al. 2021), exact published layout.

Expected files under ``root``::

    captions/cap.<dress|shirt|toptee>.<train|val|test>.json  [{"candidate", "target", "captions": [c1, c2]}]
    image_splits/split.<category>.<split>.json                ["B00006M009", ...]
    images/<name>.jpg   (also accepted: images/<name>.png, <category>/<name>.jpg)

One query per caption record; its text joins the two captions as the CIR repos do (CLIP4Cir):
``"<c1 stripped of '.?, ' and capitalised> and <c2 stripped>"``. The test split has no
``target``. ``split="val"`` reads every category found, ``split="dress.val"`` one category.

Image names are qualified by category, ``"dress/B00006M009"``: FashionIQ evaluates each category
against the whole split *of that category*, and the qualified name is how
:func:`compir.metrics.evaluate_split` restricts each query to its category's gallery
(the part before ``/``). ``Query.group`` is the category.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compir.data.files import read_name_list, read_records, require_str
from compir.data.types import CirSplit, Query
from compir.errors import DatasetError, InputError

CATEGORIES = ("dress", "shirt", "toptee")


def is_fashioniq(root: Path) -> bool:
    return any(any((root / "captions").glob(f"cap.{category}.*.json")) for category in CATEGORIES)


def qualified_name(category: str, name: str) -> str:
    return f"{category}/{name}"


def join_captions(captions: list[str]) -> str:
    """CLIP4Cir's join of a FashionIQ record's two captions."""
    first, second = captions[0].strip(".?, "), captions[1].strip(".?, ")
    return f"{first.capitalize()} and {second}"


def _image_folder(root: Path, category: str, first: str) -> tuple[Path, str]:
    candidates = [(root / "images", ".jpg"), (root / "images", ".png"), (root / category, ".jpg"), (root / category, ".png")]
    for folder, suffix in candidates:
        if (folder / f"{first}{suffix}").is_file():
            return folder.absolute(), suffix
    tried = ", ".join(str(folder / f"{first}{suffix}") for folder, suffix in candidates)
    raise DatasetError(f"FashionIQ {category} images not found; looked for the first one at: {tried}")


def read_fashioniq(root: str | Path, *, split: str) -> CirSplit:
    """Read a FashionIQ split (every category, or one with ``"<category>.<split>"``)."""
    root = Path(root)
    category, _, split_name = split.rpartition(".")
    categories = (category,) if category else tuple(
        c for c in CATEGORIES if (root / "captions" / f"cap.{c}.{split_name}.json").is_file()
    )
    if not categories or (category and category not in CATEGORIES):
        raise DatasetError(
            f"{root / 'captions'}: no FashionIQ captions for split {split!r} "
            f"(expected cap.<{'|'.join(CATEGORIES)}>.{split_name}.json)"
        )
    queries: list[Query] = []
    gallery: list[str] = []
    image_paths: dict[str, Path] = {}
    for cat in categories:
        names = read_name_list(root / "image_splits" / f"split.{cat}.{split_name}.json", what="FashionIQ image split")
        if names:
            folder, suffix = _image_folder(root, cat, names[0])
            for name in names:
                image_paths[qualified_name(cat, name)] = folder / f"{name}{suffix}"
        gallery.extend(qualified_name(cat, name) for name in names)
        queries.extend(_queries(root / "captions" / f"cap.{cat}.{split_name}.json", cat, image_paths))
    return CirSplit(
        name=split,
        protocol="fashioniq",
        root=root,
        queries=tuple(queries),
        gallery=tuple(gallery),
        image_paths=image_paths,
    )


def _queries(path: Path, category: str, image_paths: dict[str, Path]) -> list[Query]:
    records = read_records(path, what="FashionIQ captions", keys=("candidate", "captions"))
    queries = []
    for index, record in enumerate(records):
        captions = record["captions"]
        if not isinstance(captions, list) or len(captions) != 2 or not all(isinstance(c, str) for c in captions):
            raise DatasetError(f"{path}: record {index} 'captions' should be a list of two strings")
        reference = qualified_name(category, require_str(record, "candidate", source=path, index=index))
        if reference not in image_paths:
            raise DatasetError(f"{path}: record {index} candidate {reference!r} is not in the {category} image split")
        targets: tuple[str, ...] = ()
        if "target" in record:
            targets = (qualified_name(category, require_str(record, "target", source=path, index=index)),)
        queries.append(
            Query(query_id=f"{category}.{index}", reference=reference, text=join_captions(captions), targets=targets, group=category)
        )
    return queries


def val_query_gallery(split: CirSplit) -> CirSplit:
    """TG-CIR's FashionIQ gallery: only the images the split's queries name (candidates and targets).

    Returns ``split`` with that gallery (in the split's order) and protocol
    ``"fashioniq-val-queries"``, which also removes each query's reference from its own ranking
    (:mod:`compir.metrics`). TG-CIR's published FashionIQ figures use it; CLIP4Cir's (the default,
    ``"fashioniq"``) rank against the whole split of the category.
    """
    if split.protocol != "fashioniq":
        raise InputError(f"the val-queries gallery is TG-CIR's FashionIQ protocol; split {split.name!r} is {split.protocol!r}")
    named = {name for query in split.queries for name in (query.reference, *query.targets)}
    gallery = tuple(name for name in split.gallery if name in named)
    return dataclasses.replace(split, gallery=gallery, protocol="fashioniq-val-queries")
