"""Shoes reader (Guo et al. 2018, "Dialog-based interactive image retrieval"), its common CIR layout.

Expected files under ``root`` (as distributed and used by TG-CIR, ARTEMIS, CLIP-based CIR repos)::

    relative_captions_shoes.json   [{"ImageName", "ReferenceImageName", "RelativeCaption"}, ...]
    train_im_names.txt             one image name per line: the training images
    eval_im_names.txt              one image name per line: the test images (split "test"; "val" is an alias)
    <category folders>/.../<name>  the images (e.g. womens_boots/1/img_womens_boots_375.jpg), found by name

A record belongs to a split when both its reference and its target are in that split's name
list; the gallery is the whole name list (the common protocol; R@1 / R@10 / R@50).
"""

from __future__ import annotations

from pathlib import Path

from compir.data.files import read_records, require_str
from compir.data.types import CirSplit, Query
from compir.errors import DatasetError

CAPTIONS_FILE = "relative_captions_shoes.json"
_NAME_FILES = {"train": "train_im_names.txt", "test": "eval_im_names.txt", "val": "eval_im_names.txt"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def is_shoes(root: Path) -> bool:
    return (root / CAPTIONS_FILE).is_file()


def _names(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"Shoes split list {path} is missing (one image name per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not a UTF-8 text file of image names ({exc})") from exc
    return [line.strip() for line in lines if line.strip()]


def _find_images(root: Path, wanted: set[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in _IMAGE_SUFFIXES and path.name in wanted and path.name not in found:
            found[path.name] = path.absolute()
    return found


def read_shoes(root: str | Path, *, split: str) -> CirSplit:
    """Read the Shoes ``train`` or ``test`` split."""
    root = Path(root)
    if split not in _NAME_FILES:
        raise DatasetError(f"Shoes has splits train and test (val = test), not {split!r}")
    names = _names(root / _NAME_FILES[split])
    in_split = set(names)
    captions_path = root / CAPTIONS_FILE
    records = read_records(captions_path, what="Shoes captions", keys=("ImageName", "ReferenceImageName", "RelativeCaption"))
    queries = []
    for index, record in enumerate(records):
        target = require_str(record, "ImageName", source=captions_path, index=index)
        reference = require_str(record, "ReferenceImageName", source=captions_path, index=index)
        if target in in_split and reference in in_split:
            text = require_str(record, "RelativeCaption", source=captions_path, index=index)
            queries.append(Query(query_id=str(index), reference=reference, text=text, targets=(target,)))
    image_paths = _find_images(root, in_split)
    missing = [name for name in names if name not in image_paths]
    if missing:
        raise DatasetError(
            f"{len(missing)} Shoes image(s) of {root / _NAME_FILES[split]} not found under {root} "
            f"(first: {missing[0]}); unpack the image folders into the dataset root"
        )
    return CirSplit(name=split, protocol="shoes", root=root, queries=tuple(queries), gallery=tuple(names), image_paths=image_paths)
