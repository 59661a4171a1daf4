"""CIRR reader (Liu et al. 2021), exact published layout, and compir's synthetic benchmark on top of it.

Expected files (``root`` is the folder holding ``captions/``, or the one holding ``cirr/captions/``
as in the CLIP4Cir layout)::

    captions/cap.rc2.<train|val|test1>.json      [{"pairid", "reference", "target_hard",
                                                   "target_soft", "caption", "img_set"}, ...]
    image_splits/split.rc2.<train|val|test1>.json {name: "./train/34/train-...-img0.png", ...}

The relative image paths are resolved against the first of ``root``, ``root/img_raw``, the folder
above ``cirr/`` and ``root/../img_raw`` that holds the split's first image (the official download
puts images in ``img_raw/``; CLIP4Cir puts ``train/ dev/ test1/`` beside ``cirr/``). test1 has no
``target_hard``: its queries have no targets (write a submission instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compir.data.files import read_json, read_name_map, read_records, require_str
from compir.data.types import CirSplit, Query
from compir.errors import DatasetError

_SPLIT_ALIASES = {"test": "test1", "dev": "val"}


def cirr_annotation_root(root: Path) -> Path | None:
    """The folder holding ``captions/cap.rc2.*.json``: ``root`` or ``root/cirr`` (None if neither)."""
    for candidate in (root, root / "cirr"):
        if any((candidate / "captions").glob("cap.rc2.*.json")):
            return candidate
    return None


def _split_name(annotations: Path, split: str) -> str:
    if (annotations / "captions" / f"cap.rc2.{split}.json").is_file():
        return split
    alias = _SPLIT_ALIASES.get(split)
    if alias and (annotations / "captions" / f"cap.rc2.{alias}.json").is_file():
        return alias
    found = sorted(p.name.split(".")[2] for p in (annotations / "captions").glob("cap.rc2.*.json"))
    raise DatasetError(
        f"{annotations / 'captions' / f'cap.rc2.{split}.json'} is missing; splits found: {', '.join(found) or 'none'}"
    )


def cirr_image_base(root: Path, annotations: Path, relpaths: list[str]) -> Path:
    candidates = list(dict.fromkeys([root, root / "img_raw", annotations.parent, root.parent / "img_raw"]))
    probe = relpaths[:3]
    for base in candidates:
        if probe and all((base / rel).is_file() for rel in probe):
            return base.absolute()
    tried = ", ".join(str(base / probe[0]) for base in candidates) if probe else "(the split lists no images)"
    raise DatasetError(f"images of {annotations} not found; looked for the first one at: {tried}")


def read_cirr(root: str | Path, *, split: str, protocol: str = "cirr") -> CirSplit:
    """Read one CIRR split into a :class:`CirSplit` (protocol ``cirr`` unless told otherwise)."""
    root = Path(root)
    annotations = cirr_annotation_root(root)
    if annotations is None:
        raise DatasetError(f"{root} holds no captions/cap.rc2.<split>.json (nor cirr/captions/); is this CIRR?")
    split = _split_name(annotations, split)
    captions_path = annotations / "captions" / f"cap.rc2.{split}.json"
    splits_path = annotations / "image_splits" / f"split.rc2.{split}.json"
    records = read_records(captions_path, what="CIRR captions", keys=("pairid", "reference", "caption"))
    name_to_rel = read_name_map(splits_path, what="CIRR image split")
    base = cirr_image_base(root, annotations, list(name_to_rel.values()))
    queries = tuple(_query(record, index, captions_path) for index, record in enumerate(records))
    for index, query in enumerate(queries):
        if query.reference not in name_to_rel:
            raise DatasetError(f"{captions_path}: record {index} reference {query.reference!r} is not in {splits_path}")
    return CirSplit(
        name=split,
        protocol=protocol,
        root=root,
        queries=queries,
        gallery=tuple(name_to_rel),
        image_paths={name: base / rel for name, rel in name_to_rel.items()},
    )


def _query(record: dict[str, Any], index: int, source: Path) -> Query:
    reference = require_str(record, "reference", source=source, index=index)
    text = record["caption"]
    if not isinstance(text, str):
        raise DatasetError(f"{source}: record {index} caption should be a string, got {text!r}")
    targets: tuple[str, ...] = ()
    if "target_hard" in record:
        targets = (require_str(record, "target_hard", source=source, index=index),)
    subset: tuple[str, ...] = ()
    img_set = record.get("img_set")
    if img_set is not None:
        members = img_set.get("members") if isinstance(img_set, dict) else None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise DatasetError(f"{source}: record {index} img_set.members should be a list of image names")
        subset = tuple(members)
    unseen = record.get("unseen")
    return Query(
        query_id=str(record["pairid"]),
        reference=reference,
        text=text,
        targets=targets,
        subset=subset,
        kind=str(record.get("kind", "")),
        unseen=bool(unseen) if unseen is not None else None,
    )


def read_scene_captions(path: Path) -> dict[str, tuple[str, ...]]:
    """``captions/scene.<split>.json``: image name -> list of descriptions."""
    raw = read_json(path, what="scene captions")
    if not isinstance(raw, dict) or not all(
        isinstance(texts, list) and all(isinstance(t, str) for t in texts) for texts in raw.values()
    ):
        raise DatasetError(f"{path} should map image names to lists of descriptions")
    return {name: tuple(texts) for name, texts in raw.items()}
