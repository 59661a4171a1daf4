"""``load_split``: one entry point for every dataset format compir reads, torch-free.

Formats (``fmt``): ``cirr``, ``fashioniq``, ``shoes``, ``synthetic`` (compir's benchmark: the CIRR
layout plus a ``dataset.json``), or ``auto``, which looks at the files under ``root``:

- ``dataset.json`` of format ``compir.synthetic``  -> synthetic
- ``captions/cap.rc2.*.json`` (or ``cirr/captions/``) -> cirr
- ``captions/cap.<dress|shirt|toptee>.*.json``     -> fashioniq
- ``relative_captions_shoes.json``                   -> shoes
"""

from __future__ import annotations

from pathlib import Path

from compir.data.cirr import cirr_annotation_root, read_cirr
from compir.data.fashioniq import is_fashioniq, read_fashioniq
from compir.data.files import check_images, raise_image_problems
from compir.data.shoes import is_shoes, read_shoes
from compir.data.synthetic import is_synthetic, read_synthetic
from compir.data.types import CirSplit
from compir.errors import DatasetError

FORMATS = ("auto", "cirr", "fashioniq", "shoes", "synthetic")


def detect_format(root: str | Path) -> str:
    """The format of the dataset under ``root``; DatasetError if it is none compir reads."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder")
    if is_synthetic(root):
        return "synthetic"
    if cirr_annotation_root(root) is not None:
        return "cirr"
    if is_fashioniq(root):
        return "fashioniq"
    if is_shoes(root):
        return "shoes"
    raise DatasetError(
        f"{root}: no known dataset layout (expected dataset.json, captions/cap.rc2.*.json, "
        "captions/cap.<category>.*.json or relative_captions_shoes.json); pass the dataset's root folder"
    )


def load_split(root: str | Path, *, split: str, fmt: str = "auto", check: bool = False) -> CirSplit:
    """Read one split of a dataset into a :class:`~compir.data.types.CirSplit`.

    ``split`` uses the dataset's own names (CIRR: train / val / test1, FashionIQ: train / val /
    test, optionally one category as ``dress.val``; Shoes: train / test; synthetic: train / val /
    test). Images are not opened unless ``check`` is True: then every image is decoded and one
    DatasetError lists every missing or corrupt file (see :func:`compir.data.files.check_images`).
    """
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    root = Path(root)
    chosen = detect_format(root) if fmt == "auto" else fmt
    readers = {"synthetic": read_synthetic, "cirr": read_cirr, "fashioniq": read_fashioniq, "shoes": read_shoes}
    loaded = readers[chosen](root, split=split)
    if check:
        raise_image_problems(check_images(loaded), split=loaded)
    return loaded
