"""Data without triplets, torch-free: image-caption pairs (open_clip's CSV) and plain image files.

Used by ``compir train --objective clip`` (pairs) and by a textual-inversion head (Pic2Word: images only).

- :func:`read_caption_csv`: open_clip's training CSV (``--csv-img-key filepath``, ``--csv-caption-key title``,
  ``--csv-separator`` tab by default, as open_clip's flags). Image paths are absolute or relative to the CSV's
  folder. Every row is checked before training starts: a missing or empty caption, an image that does not
  exist or does not open is a DatasetError naming the file and the row (rows count from 2: line 1 is the header).
- :func:`find_caption_csv`: DATA is the CSV, or a folder holding exactly one ``*.csv`` / ``*.tsv``.
- :func:`list_photos`: every image file under a folder (recursive), the user's catalog.
- :func:`dataset_train_images`: a CIRR-layout dataset's training images from its image list alone (its
  caption / triplet files are never read).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from compir.data.cirr import cirr_annotation_root, cirr_image_base
from compir.data.files import read_name_map
from compir.errors import DatasetError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CSV_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class CaptionedImages:
    """Image-caption pairs read from ``source``; ``rows[i]`` is the file's row number of pair i (for errors)."""

    source: Path
    paths: tuple[Path, ...]
    captions: tuple[str, ...]
    rows: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, index: int) -> str:
        """``"FILE row N"`` of pair ``index``: what every error about it names."""
        return f"{self.source} row {self.rows[index]}"

    def subset(self, indices: list[int]) -> CaptionedImages:
        return CaptionedImages(self.source, tuple(self.paths[i] for i in indices), tuple(self.captions[i] for i in indices),
                               tuple(self.rows[i] for i in indices))


def find_caption_csv(data: Path) -> Path:
    """The CSV that ``data`` names: the file itself, or the one CSV / TSV inside a folder."""
    if data.is_file():
        return data
    if not data.is_dir():
        raise DatasetError(f"{data} does not exist; pass a CSV of image paths and captions or the folder holding it")
    found = sorted(p for p in data.iterdir() if p.suffix.lower() in CSV_SUFFIXES and p.is_file())
    if not found:
        raise DatasetError(f"{data} holds no CSV of image paths and captions (*.csv or *.tsv); --objective clip needs one "
                           "(or the synthetic benchmark)")
    if len(found) > 1:
        raise DatasetError(f"{data} holds {len(found)} CSV files ({', '.join(p.name for p in found[:5])}); pass the one to train on")
    return found[0]


def read_caption_csv(path: Path, *, img_key: str = "filepath", caption_key: str = "title", separator: str = "\t") -> CaptionedImages:
    """Every row of an open_clip CSV as an (image path, caption) pair, each checked (see the module doc)."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=separator)
            header = list(reader.fieldnames or [])
            missing = [key for key in (img_key, caption_key) if key not in header]
            if missing:
                raise DatasetError(
                    f"{path}: no column {', '.join(repr(k) for k in missing)} in its header {header} (separator {separator!r}); "
                    "set --csv-img-key / --csv-caption-key / --csv-separator")
            records = [(reader.line_num, record) for record in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: unreadable CSV ({exc})") from exc
    if not records:
        raise DatasetError(f"{path}: the CSV has a header but no rows")
    paths, captions, rows = [], [], []
    for row, record in records:
        caption, name = (record.get(caption_key) or "").strip(), (record.get(img_key) or "").strip()
        if not caption:
            raise DatasetError(f"{path} row {row}: the caption ({caption_key!r}) is missing or empty; give every image a caption "
                               "or remove its row")
        if not name:
            raise DatasetError(f"{path} row {row}: the image path ({img_key!r}) is missing or empty")
        image = Path(name) if Path(name).is_absolute() else path.parent / name
        problem = image_problem(image)
        if problem:
            raise DatasetError(f"{path} row {row}: image {image} {problem}")
        paths.append(image)
        captions.append(caption)
        rows.append(row)
    return CaptionedImages(path, tuple(paths), tuple(captions), tuple(rows))


def image_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable image (None: it opens). Reads the header only: a file truncated further
    in is reported when training decodes it (with its file and row)."""
    if not path.is_file():
        return "does not exist"
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"does not decode ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def list_photos(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, by suffix: jpg jpeg png webp bmp), sorted; none is an error."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder of images")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if not found:
        raise DatasetError(f"{folder} holds no images ({', '.join(PHOTO_SUFFIXES)}, searched recursively)")
    return found


def dataset_train_images(root: Path) -> list[Path] | None:
    """A CIRR-layout dataset's training images, read from ``image_splits/split.rc2.train.json`` alone (None: not
    such a dataset, or no train image list); the images must exist."""
    annotations = cirr_annotation_root(root)
    listing = None if annotations is None else annotations / "image_splits" / "split.rc2.train.json"
    if listing is None or not listing.is_file():
        return None
    relpaths = list(read_name_map(listing, what="CIRR image split").values())
    assert annotations is not None
    base = cirr_image_base(root, annotations, relpaths)
    return [base / rel for rel in relpaths]
