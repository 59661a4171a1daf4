"""On-disk contracts shared by every stage: JSON files with a format name, a schema version
and sha256 checksums, written atomically.

Every artifact compir writes (checkpoint, export manifest, engines record, index record) is
identified by ``{"format": NAME, "schema_version": N, ...}``; readers call
:func:`read_contract` and get a clear :class:`ContractError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compir.errors import ContractError

CHECKPOINT_FORMAT = "compir.checkpoint"
CHECKPOINT_SCHEMA = 1
MANIFEST_FORMAT = "compir.export"
MANIFEST_SCHEMA = 2  # 2: zero-shot composition (token_mapper + prompt_encoder graphs, no composer); exports with a
# learned composer are still written as 1, so older runtimes keep loading them and refuse a zero-shot one ("upgrade")
MANIFEST_SCHEMA_COMPOSER = 1
ENGINES_FORMAT = "compir.engines"
ENGINES_SCHEMA = 1
INDEX_FORMAT = "compir.index"
INDEX_SCHEMA = 3  # 3: a Milvus-backed index (usearch ones are still written as 2); 2: bound to an encoder fingerprint;
# 1: to the export manifest's sha256

MANIFEST_FILE = "manifest.json"
ENGINES_FILE = "engines.json"
INDEX_FILE = "index.json"


def sha256_file(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB graphs do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_sha256(path: Path, expected: str, *, what: str) -> None:
    """Raise ContractError unless ``path`` exists and hashes to ``expected``."""
    if not path.is_file():
        raise ContractError(f"{what}: file {path} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise ContractError(
            f"{what}: {path} is damaged or was replaced (sha256 {actual[:12]}..., "
            f"expected {expected[:12]}...); re-create it with the command that made it"
        )


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform (e.g. Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    Temporary file in the same folder, fsync, rename over the target, fsync the folder.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


@contextmanager
def atomic_output_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto it.

    For writers that insist on a file name of their own (usearch, onnx, torch.save).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """``path``, after checking that a new folder may be written there (before long work starts)."""
    target = Path(path)
    if target.exists() and not overwrite and any(target.iterdir()):
        raise ContractError(f"{target} already exists and is not empty; pass --overwrite to replace it")
    return target


@contextmanager
def atomic_output_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    A failure (a parity check, a crash) leaves no half-written folder behind.
    """
    target = check_output_dir(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def write_contract(path: str | os.PathLike[str], *, fmt: str, schema_version: int, body: dict[str, Any]) -> None:
    """Atomically write a JSON contract file with its format name and schema version first."""
    record = {"format": fmt, "schema_version": schema_version, **body}
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def check_header(record: Any, *, fmt: str, schema_version: int, source: str) -> dict[str, Any]:
    """Validate the ``format`` / ``schema_version`` header of an already-parsed contract."""
    if not isinstance(record, dict):
        raise ContractError(f"{source}: expected a JSON object, got {type(record).__name__}")
    found = record.get("format")
    if found != fmt:
        raise ContractError(f"{source}: format is {found!r}, expected {fmt!r}; is this the right file?")
    version = record.get("schema_version")
    if not isinstance(version, int):
        raise ContractError(f"{source}: schema_version is missing or not an integer")
    if version > schema_version:
        raise ContractError(
            f"{source}: schema version {version} is newer than this compir understands "
            f"({schema_version}); upgrade compir"
        )
    if version < 1:
        raise ContractError(f"{source}: schema version {version} is invalid")
    return record


def read_contract(path: str | os.PathLike[str], *, fmt: str, schema_version: int) -> dict[str, Any]:
    """Read and validate a JSON contract file. Raises ContractError naming the file on any problem."""
    source = Path(path)
    if not source.is_file():
        raise ContractError(f"{source} is missing; create it with the command that produces {fmt!r} files")
    try:
        record = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"{source} is damaged (not valid JSON: {exc})") from exc
    return check_header(record, fmt=fmt, schema_version=schema_version, source=str(source))


def require_keys(record: dict[str, Any], keys: list[str], *, source: str) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise ContractError(f"{source}: missing field(s) {', '.join(missing)}")
