"""TensorRT's ONNX parser rules, read from ``parser_rules.json`` (data, one file: update it when
TensorRT changes, not this code). Which operators, opsets and data types each recorded TensorRT
release parses, and the restrictions the lint (:mod:`compir.export.trt.lint`) checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from compir.errors import ContractError

RULES_FILE = Path(__file__).with_name("parser_rules.json")
RULES_FORMAT = "compir-trt-parser-rules"


def version_key(version: str) -> tuple[int, ...]:
    """``"10.3"`` -> (10, 3): release strings compare numerically (10.15 is after 10.3)."""
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError as exc:
        raise ContractError(f"not a TensorRT version: {version!r} (expected MAJOR.MINOR)") from exc


def in_range(release: str, *, since: str | None, until: str | None) -> bool:
    """Whether ``release`` is in [since, until): ``since`` added the op / type, ``until`` lifted the rule."""
    key = version_key(release)
    return (since is None or version_key(since) <= key) and (until is None or key < version_key(until))


@dataclass(frozen=True)
class Operator:
    """One row of the operator matrix."""

    name: str
    supported: bool
    types: tuple[str, ...]
    since: str | None = None
    types_before: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (release, types before it)
    type_param: str | None = None  # the schema type parameter the types apply to (default: the first input's)

    def types_at(self, release: str) -> tuple[str, ...]:
        for before, types in sorted(self.types_before, key=lambda item: version_key(item[0])):
            if version_key(release) < version_key(before):
                return types
        return self.types


@dataclass(frozen=True)
class Restriction:
    """One restriction of the matrix's Restrictions column, as a named check with its parameters."""

    id: str
    ops: tuple[str, ...]
    check: str
    text: str
    source: str
    params: dict[str, Any]
    until: str | None = None

    def applies(self, release: str) -> bool:
        return in_range(release, since=None, until=self.until)


@dataclass(frozen=True)
class ParserRules:
    """Everything ``parser_rules.json`` records."""

    read_on: str
    releases: dict[str, dict[str, Any]]
    sources: dict[str, str]
    data_types: dict[str, Any]
    operators: dict[str, Operator]
    restrictions: tuple[Restriction, ...]
    dynamic_shapes: dict[str, str]
    operators_source: str

    def opset_range(self, release: str) -> tuple[int, int]:
        low, high = self.releases[release]["opset"]
        return int(low), int(high)

    def source(self, key: str) -> str:
        return self.sources.get(key, key)


@cache
def load_rules(path: Path = RULES_FILE) -> ParserRules:
    """Parse and check the rules file; ContractError naming what is wrong."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ContractError(f"cannot read TensorRT parser rules {path}: {exc}") from exc
    if raw.get("format") != RULES_FORMAT or raw.get("schema") != 1:
        raise ContractError(f"{path} is not a {RULES_FORMAT} schema 1 file")
    operators = {name: _operator(name, row) for name, row in raw["operators"].items()}
    restrictions = tuple(_restriction(row) for row in raw["restrictions"])
    for rule in restrictions:
        unknown = [op for op in rule.ops if op not in operators]
        if unknown or rule.source not in raw["sources"]:
            raise ContractError(f"{path}: restriction {rule.id!r} names ops {unknown} or source {rule.source!r} not in the file")
    return ParserRules(
        read_on=str(raw["read_on"]),
        releases=dict(raw["releases"]),
        sources=dict(raw["sources"]),
        data_types=dict(raw["data_types"]),
        operators=operators,
        restrictions=restrictions,
        dynamic_shapes=dict(raw["dynamic_shapes"]),
        operators_source=str(raw["operators_source"]),
    )


def _operator(name: str, row: dict[str, Any]) -> Operator:
    before = tuple((release, tuple(types)) for release, types in row.get("types_before", {}).items())
    return Operator(
        name=name,
        supported=bool(row.get("supported", True)),
        types=tuple(row.get("types", ())),
        since=row.get("since"),
        types_before=before,
        type_param=row.get("type_param"),
    )


def _restriction(row: dict[str, Any]) -> Restriction:
    fixed = {"id", "ops", "check", "text", "source", "until"}
    return Restriction(
        id=str(row["id"]),
        ops=tuple(row["ops"]),
        check=str(row["check"]),
        text=str(row["text"]),
        source=str(row["source"]),
        params={key: value for key, value in row.items() if key not in fixed},
        until=row.get("until"),
    )
