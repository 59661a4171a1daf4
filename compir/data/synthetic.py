"""Reader of compir's synthetic benchmark: the CIRR reader plus ``kind`` / ``unseen``, scene captions
and object identities (``captions/identity.<split>.json``; derived from the scene names for a
dataset written before that file existed).

``dataset.json`` (format ``compir.synthetic``) is checked first: format, schema version and the
sha256 of every caption / split file, so a damaged or hand-edited dataset fails loudly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from compir.contracts import check_header, sha256_file
from compir.data.cirr import read_cirr, read_scene_captions
from compir.data.files import read_json
from compir.data.synth import SynthConfig
from compir.data.synth_scene import parse_scene_key, scene_identity
from compir.data.synth_write import DATASET_FILE, SYNTH_FORMAT, SYNTH_SCHEMA, identity_file, scene_caption_file
from compir.data.types import CirSplit
from compir.errors import ContractError, DatasetError


def is_synthetic(root: Path) -> bool:
    """True where ``root`` holds a dataset.json of format ``compir.synthetic``."""
    path = root / DATASET_FILE
    if not path.is_file():
        return False
    try:
        record = read_json(path, what="synthetic dataset record")
    except DatasetError:
        return True  # damaged: claim it, so that reading it reports the damage
    return isinstance(record, dict) and record.get("format") == SYNTH_FORMAT


def read_dataset_record(root: str | Path) -> dict[str, Any]:
    """Validated ``dataset.json`` of a synthetic dataset (format, schema version, checksums)."""
    root = Path(root)
    path = root / DATASET_FILE
    record = read_json(path, what="synthetic dataset record")
    try:
        check_header(record, fmt=SYNTH_FORMAT, schema_version=SYNTH_SCHEMA, source=str(path))
    except ContractError as exc:
        raise DatasetError(str(exc)) from exc
    checksums = record.get("sha256")
    if not isinstance(checksums, dict) or not isinstance(record.get("config"), dict):
        raise DatasetError(f"{path}: missing 'sha256' or 'config'; re-create it with compir data synth")
    for relpath, expected in checksums.items():
        file = root / relpath
        if not file.is_file():
            raise DatasetError(f"{file} is missing (listed in {path}); re-create the dataset with compir data synth")
        if sha256_file(file) != expected:
            raise DatasetError(f"{file} does not match its sha256 in {path}: damaged or edited; re-create it")
    return dict(record)


def synth_config_of(root: str | Path) -> SynthConfig:
    """The :class:`SynthConfig` a synthetic dataset was rendered with (for on-the-fly training)."""
    record = read_dataset_record(root)
    try:
        return SynthConfig.from_dict(record["config"])
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{Path(root) / DATASET_FILE}: bad config ({exc})") from exc


def read_synthetic(root: str | Path, *, split: str) -> CirSplit:
    """Read one split (train / val / test) of a synthetic dataset written by ``compir data synth``."""
    root = Path(root)
    record = read_dataset_record(root)
    if split not in record.get("splits", []):
        raise DatasetError(f"{root / DATASET_FILE}: no split {split!r}; splits: {', '.join(record.get('splits', []))}")
    base = read_cirr(root, split=split, protocol="synthetic")
    captions = read_scene_captions(root / scene_caption_file(split))
    if identity_file(split) in record["sha256"]:
        identities = _read_identities(root / identity_file(split))
    else:  # written before the identity files: the scene names say the same
        identities = {name: scene_identity(parse_scene_key(name)) for name in base.image_paths}
    return dataclasses.replace(base, captions=captions, identities=identities)


def _read_identities(path: Path) -> dict[str, str]:
    raw = read_json(path, what="scene identities")
    if not isinstance(raw, dict) or not all(isinstance(value, str) for value in raw.values()):
        raise DatasetError(f"{path} should map image names to identity names")
    return dict(raw)
