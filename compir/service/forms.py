"""Strict reading of form bodies (multipart/form-data and application/x-www-form-urlencoded).

Starlette's form parser is lenient where this API must not be: it drops a part that a cut-short
body leaves unfinished, decodes text that is not UTF-8 as Latin-1, keeps the last of two values
sent for one field, and FastAPI ignores fields no endpoint takes. A :class:`FormSpec` reads the
whole body itself (its size is capped by the Gatekeeper middleware) and refuses, naming the problem:

- 400: not a well-formed body: a multipart body must start with its delimiter ``--BOUNDARY``,
  every part must have headers and end at a delimiter, and the closing delimiter ``--BOUNDARY--``
  (optionally followed by CRLF) must end the body; text must be UTF-8;
- 415: neither form content type;
- 422: a field the endpoint does not take, a field sent twice, a file where text belongs or text
  where a file belongs, an empty value (an empty file part is what a browser sends when no file
  was chosen), a number that is not plain decimal digits, a flag other than ``true`` / ``false``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote_plus

from fastapi import HTTPException, Request
from python_multipart.multipart import parse_options_header

from compir.errors import InputError

Kind = Literal["text", "integer", "boolean", "file"]
Value = str | int | bool
MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
MAX_HEADER_BYTES = 16 * 1024  # the header block of one part
_INTEGER = re.compile(r"-?[0-9]{1,18}")  # what JSON writes for an integer, leading zeros aside
_SCHEMA_TYPES = {"text": {"type": "string"}, "integer": {"type": "integer"}, "boolean": {"type": "boolean"},
                 "file": {"type": "string", "format": "binary"}}


@dataclass(frozen=True)
class Upload:
    """One file part: the file name the client gave ("" when none) and its bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class FormField:
    name: str
    kind: Kind
    description: str
    default: Value | None = None
    repeated: bool = False  # may be sent more than once (a list)
    required: bool = False
    blank_ok: bool = False  # "" is a value (the query text, whose emptiness the retriever judges)


@dataclass(frozen=True)
class _Part:
    name: str
    filename: str | None  # None: a text part
    data: bytes


@dataclass(frozen=True)
class Form:
    """The checked fields of one request, converted to their kinds; absent fields read as their default."""

    spec: FormSpec
    values: dict[str, list[Value | Upload]] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        value = self._value(name)
        return value if isinstance(value, str) else None

    def integer(self, name: str) -> int:
        value = self._value(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"form field {name!r} is not an integer field with a default")
        return value

    def flag(self, name: str) -> bool:
        value = self._value(name)
        if not isinstance(value, bool):
            raise TypeError(f"form field {name!r} is not a boolean field with a default")
        return value

    def _value(self, name: str) -> Value | Upload | None:
        got = self.values.get(name)
        return got[0] if got else self.spec.field(name).default

    def upload(self, name: str) -> Upload | None:
        return self.uploads(name)[0] if self.values.get(name) else None

    def uploads(self, name: str) -> list[Upload]:
        return [item for item in self.values.get(name, []) if isinstance(item, Upload)]

    def texts(self, name: str) -> list[str]:
        return [item for item in self.values.get(name, []) if isinstance(item, str)]


class FormSpec:
    """The fields one endpoint takes; :meth:`read` is its FastAPI dependency, :meth:`openapi` its schema."""

    def __init__(self, *fields: FormField) -> None:
        self.fields = {f.name: f for f in fields}

    def field(self, name: str) -> FormField:
        return self.fields[name]

    async def read(self, request: Request) -> Form:
        kind, _, _ = request.headers.get("content-type", "").partition(";")
        kind = kind.strip().lower()
        if kind == MULTIPART:
            parts = parse_multipart(await request.body(), request.headers["content-type"])
        elif kind == URLENCODED:
            parts = parse_urlencoded(await request.body())
        else:
            raise HTTPException(415, f"this endpoint takes {MULTIPART}, not {kind or 'a body without a content type'}")
        return self.check(parts)

    def check(self, parts: Sequence[_Part]) -> Form:
        unknown = list(dict.fromkeys(p.name for p in parts if p.name not in self.fields))
        if unknown:
            raise InputError(f"unknown form field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                             f"this endpoint takes {', '.join(self.fields)}")
        values: dict[str, list[Value | Upload]] = {}
        for part in parts:
            spec = self.fields[part.name]
            if values.get(part.name) and not spec.repeated:
                raise InputError(f"form field {part.name!r} is sent more than once; send it once")
            values.setdefault(part.name, []).append(_convert(spec, part))
        missing = [name for name, spec in self.fields.items() if spec.required and name not in values]
        if missing:
            raise InputError(f"form field {missing[0]!r} is required")
        return Form(self, values)

    def openapi(self) -> dict[str, Any]:
        """``openapi_extra`` for the route: its multipart request body, each field with its kind."""
        properties: dict[str, Any] = {}
        for spec in self.fields.values():
            schema: dict[str, Any] = {**_SCHEMA_TYPES[spec.kind]}
            if spec.default is not None:
                schema["default"] = spec.default
            properties[spec.name] = ({"type": "array", "items": schema} if spec.repeated else schema) | {
                "description": spec.description}
        body = {"type": "object", "properties": properties, "additionalProperties": False,
                "required": [name for name, spec in self.fields.items() if spec.required]}
        return {"requestBody": {"required": True, "content": {MULTIPART: {"schema": body}}}}


def _convert(spec: FormField, part: _Part) -> Value | Upload:
    name = part.name
    if spec.kind == "file":
        if part.filename is None:
            what = "empty" if not part.data else "a text value"
            raise InputError(f"form field {name!r} is {what}; it takes a file upload (curl -F {name}=@FILE)")
        if not part.data:
            if not part.filename:
                raise InputError(f"form field {name!r} is empty: no file was chosen")
            raise InputError(f"form field {name!r}: the file {part.filename!r} is empty (0 bytes)")
        return Upload(part.filename, part.data)
    if part.filename is not None:
        raise InputError(f"form field {name!r} takes a text value, not a file upload")
    text = _utf8(part.data, what=f"form field {name!r}")
    if not text and not spec.blank_ok:
        raise InputError(f"form field {name!r} is empty; give a value or leave the field out")
    if spec.kind == "integer":
        if not _INTEGER.fullmatch(text):
            raise InputError(f"{name}: must be a whole number in decimal digits (like 10), got {_shown(text)}")
        return int(text)
    if spec.kind == "boolean":
        if text not in ("true", "false"):
            raise InputError(f"{name}: must be true or false, got {_shown(text)}")
        return text == "true"
    return text


def parse_multipart(body: bytes, content_type: str) -> list[_Part]:
    """The parts of a multipart/form-data body, read strictly (see the module docstring)."""
    boundary = _boundary(content_type)
    dash = b"--" + boundary
    close = (dash + b"--").decode("latin-1")
    delimiter = b"\r\n" + dash
    if body.startswith(dash + b"--") and body[len(dash) + 2 :] in (b"", b"\r\n"):
        return []
    if not body.startswith(dash + b"\r\n"):
        if dash.startswith(body) or (dash + b"\r\n").startswith(body):
            raise _cut_short("before its first part", close)
        raise HTTPException(400, f"the multipart body does not start with its boundary {dash.decode('latin-1')!r}")
    parts: list[_Part] = []
    pos = len(dash) + 2
    while True:
        number = len(parts) + 1
        head_end = body.find(b"\r\n\r\n", pos, pos + MAX_HEADER_BYTES)
        if head_end < 0:
            if len(body) - pos >= MAX_HEADER_BYTES:
                raise HTTPException(400, f"the headers of multipart part {number} exceed {MAX_HEADER_BYTES} bytes")
            raise _cut_short(f"inside the headers of part {number}", close)
        name, filename = _disposition(body[pos:head_end], number)
        start = head_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            raise _cut_short(f"inside part {number} ({name!r})", close)
        parts.append(_Part(name, filename, body[start:end]))
        pos = end + len(delimiter)
        after = body[pos : pos + 2]
        if after == b"\r\n":
            pos += 2
            continue
        if after == b"--":
            if body[pos + 2 :] not in (b"", b"\r\n"):
                raise HTTPException(400, f"the multipart body goes on after its closing boundary {close!r}")
            return parts
        if len(after) < 2:
            raise _cut_short(f"inside the delimiter after part {number}", close)
        raise HTTPException(400, f"the boundary after multipart part {number} is followed by {after!r}, not CRLF or '--'")


def parse_urlencoded(body: bytes) -> list[_Part]:
    """The fields of an application/x-www-form-urlencoded body; every pair is ``name=value``."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPException(400, "an urlencoded form body must be ASCII (percent-encode other bytes)") from None
    parts = []
    for pair in text.split("&") if text else []:
        raw_name, equals, raw_value = pair.partition("=")
        if not equals or not raw_name:
            raise HTTPException(400, f"malformed urlencoded form: {_shown(pair)} is not name=value")
        name = _unquote(raw_name, what=f"the form field name {_shown(raw_name)}")
        parts.append(_Part(name, None, _unquote(raw_value, what=f"form field {name!r}").encode()))
    return parts


def _boundary(content_type: str) -> bytes:
    _, options = parse_options_header(content_type.encode("latin-1"))
    boundary = options.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 70:
        raise HTTPException(400, "a multipart/form-data body needs a boundary of 1-70 characters in its Content-Type")
    return boundary


def _disposition(block: bytes, number: int) -> tuple[str, str | None]:
    """(field name, file name or None) from a part's header block."""
    dispositions = [line.split(b":", 1)[1] for line in block.split(b"\r\n")
                    if line.split(b":", 1)[0].strip().lower() == b"content-disposition" and b":" in line]
    if len(dispositions) != 1:
        raise HTTPException(400, f"multipart part {number} needs one Content-Disposition header, it has {len(dispositions)}")
    kind, options = parse_options_header(dispositions[0].strip())
    if kind != b"form-data" or not options.get(b"name"):
        raise HTTPException(400, f"multipart part {number}: Content-Disposition must be form-data with a name")
    name = _utf8(options[b"name"], what=f"the name of multipart part {number}")
    filename = options.get(b"filename")
    return name, None if filename is None else _utf8(filename, what=f"the file name of form field {name!r}")


def _utf8(data: bytes, *, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _unquote(raw: str, *, what: str) -> str:
    try:
        return unquote_plus(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"{what} is not UTF-8 text once percent-decoded ({exc.reason})") from None


def _cut_short(where: str, close: str) -> HTTPException:
    return HTTPException(400, f"the multipart body is cut short: it ends {where}, before its closing "
                              f"boundary {close!r} (an incomplete upload)")


def _shown(text: str) -> str:
    return repr(text[:20]) + ("..." if len(text) > 20 else "")
