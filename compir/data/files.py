"""Reading dataset files: JSON with the file named in every error, record field checks, image checks."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compir.data.types import CirSplit
from compir.errors import DatasetError, InputError
from compir.images import load_image


def read_json(path: Path, *, what: str) -> Any:
    """Parse a JSON file; a missing or malformed file is a DatasetError naming it."""
    if not path.is_file():
        raise DatasetError(f"{what}: {path} is missing; check the dataset root and split name")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{what}: {path} is not valid JSON ({exc}); re-download or re-create it") from exc


def read_records(path: Path, *, what: str, keys: Iterable[str]) -> list[dict[str, Any]]:
    """A JSON list of objects, each holding ``keys``; the first bad record is reported by index."""
    records = read_json(path, what=what)
    if not isinstance(records, list):
        raise DatasetError(f"{what}: {path} should hold a JSON list of records, got {type(records).__name__}")
    required = list(keys)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: record {index} is {type(record).__name__}, expected an object")
        missing = [key for key in required if key not in record]
        if missing:
            raise DatasetError(f"{path}: record {index} lacks field(s) {', '.join(missing)}")
    return records


def read_name_map(path: Path, *, what: str) -> dict[str, str]:
    """A JSON object mapping image names to strings (CIRR's relative paths)."""
    mapping = read_json(path, what=what)
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DatasetError(f"{what}: {path} should map image names to relative paths (a JSON object of strings)")
    return mapping


def read_name_list(path: Path, *, what: str) -> list[str]:
    """A JSON list of image names (FashionIQ's image_splits)."""
    names = read_json(path, what=what)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{what}: {path} should hold a JSON list of image names")
    return names


def require_str(record: Mapping[str, Any], key: str, *, source: Path, index: int) -> str:
    value = record[key]
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{source}: record {index} field {key!r} should be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class ImageProblem:
    """One unusable image of a split: its name, its path and what is wrong."""

    name: str
    path: Path
    problem: str


def check_images(split: CirSplit, *, names: Iterable[str] | None = None, decode: bool = True) -> list[ImageProblem]:
    """Check that every image of ``split`` (or of ``names``) exists and decodes.

    Returns every problem found (empty list: all good); :func:`raise_image_problems` turns a
    non-empty list into one DatasetError that names the files.
    """
    wanted = list(split.gallery) if names is None else list(names)
    for query in split.queries:
        if names is None and query.reference not in split.image_paths:
            wanted.append(query.reference)
    problems: list[ImageProblem] = []
    for name in dict.fromkeys(wanted):
        path = split.image_paths.get(name)
        if path is None:
            problems.append(ImageProblem(name, split.root, "not listed in the split's image files"))
            continue
        if not path.is_file():
            problems.append(ImageProblem(name, path, "file is missing"))
            continue
        if decode:
            try:
                load_image(path)
            except InputError as exc:
                problems.append(ImageProblem(name, path, str(exc)))
    return problems


def raise_image_problems(problems: list[ImageProblem], *, split: CirSplit, shown: int = 10) -> None:
    if not problems:
        return
    listed = "; ".join(f"{p.path}: {p.problem}" for p in problems[:shown])
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    raise DatasetError(f"split {split.name!r} under {split.root}: {len(problems)} bad image(s): {listed}{more}")
