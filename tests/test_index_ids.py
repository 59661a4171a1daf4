"""File names -> item ids: ``compir index build`` never stores an id the HTTP service cannot serve,
and uploads get their ids by one rule (:mod:`compir.runtime.uploads`)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from PIL import Image

from compir.errors import InputError
from compir.runtime.gallery import Gallery
from compir.runtime.index_cli import main as index_main
from compir.runtime.retriever import Retriever
from compir.runtime.uploads import upload_item_id, validate_item_id
from compir.service.app import create_app
from compir.service.config import ServiceConfig
from compir.service.engine import ServiceEngine
from compir.service.server import BackgroundServer

# File names (bytes, below the image folder) that cannot be ids, with a word of the rule they break.
REFUSED = {
    b"bad\xffname.png": "surrogate",  # not UTF-8
    b" lead.png": "whitespace",
    b"trail .png": "whitespace",
    b"x\ny.png": "control",
    b"tab\tname.png": "control",
    b"cr\rname.png": "control",
    b"del\x7f.png": "control",
    b"esc\x1bname.png": "control",
    b"back\\slash.png": "backslash",
    "nb\xa0sp.png".encode(): "space other than",
    "\xa0lead.png".encode(): "space other than",
    "rlo\u202egnp.png".encode(): "format",  # shows as "rlopng.png"
    "zero\u200bwidth.png".encode(): "format",
    "bom\ufeff.png".encode(): "format",
    "line\u2028sep.png".encode(): "line separator",
    b"sub dir /y.png": "whitespace",
    b"d" * 100 + b"/" + b"e" * 100 + b"/" + b"f" * 96 + b".png": "characters long",  # a 298-character id
}
# Odd but valid: each must be listed, searched and looked up through HTTP.
ACCEPTED = [
    "plain", "caf\xe9", "snow\u2603", "\u65e5\u672c\u8a9e", "emoji\U0001f600", "with space", "a%20b", "q?mark", "hash#x",
    "amp&x", "plus+x", "quote's", 'dq"x', "semi;colon", "colon:x", "star*x", "lt<gt>", "pipe|x", "brace{x}", "tilde~x",
    "dots..x", "x.tar", "comb\u0301ining", "back`tick", "at@x", "dollar$x", "nested/deep/z",
]


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(root: Path, name: bytes, data: bytes) -> None:
    """Create ``root/name`` through the bytes API: names that are not UTF-8 are made as they are."""
    path = os.fsencode(root) + b"/" + name
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("odd") / "images"
    root.mkdir()
    for seed, name in enumerate([*REFUSED, *(f"{n}.png".encode() for n in ACCEPTED), b"dup.png", b"dup.jpg", b"other/dup.png"]):
        _write(root, name, _png(seed))
    return root


def _build(tiny_export: Path, images: Path, out: Path, *extra: str) -> int:
    return index_main(["build", str(tiny_export), "--images", str(images), "--out", str(out), "--quiet", "--workers", "2", *extra])


def test_odd_file_names_are_skipped_by_name_and_the_rest_is_served(
    tiny_export: Path, odd_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "index"
    assert _build(tiny_export, odd_folder, out) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert all(line.startswith("skipped: ") for line in lines), lines  # one line each, however odd the name
    for name, rule in REFUSED.items():
        shown = repr(name) if name == b"bad\xffname.png" else repr(name.decode())
        line = next((line for line in lines if line.startswith(f"skipped: {shown}:")), None)
        assert line is not None and rule in line, (shown, lines)
    dup_lines = [line for line in lines if "'dup.png'" in line]
    assert len(dup_lines) == 1 and "'dup.jpg'" in dup_lines[0] and "'dup'" in dup_lines[0], lines
    assert len(lines) == len(REFUSED) + 1
    stored = Gallery.load(out, encoder=None).ids
    assert sorted(stored) == sorted([*ACCEPTED, "other/dup"])
    assert f"indexed {len(stored)} images" in captured.out and f"skipped {len(REFUSED) + 1}" in captured.out

    # Every stored id can be served: listed, searched, and looked up by id.
    retriever = Retriever.from_dirs(tiny_export, out, providers=["cpu"])
    with BackgroundServer(create_app(ServiceEngine(retriever, config=ServiceConfig()))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        listed = client.get("/gallery/items", params={"limit": 1000})
        assert listed.status_code == 200, listed.text
        assert sorted(listed.json()["items"]) == sorted(stored)
        found = client.post("/search/text", json={"text": "a red circle", "k": len(stored)})
        assert found.status_code == 200, found.text
        assert sorted(hit["item_id"] for hit in found.json()["hits"]) == sorted(stored)
        for item_id in stored:
            image = client.get(f"/gallery/items/{quote(item_id)}/image")
            assert image.status_code == 200, (item_id, image.text)
            by_id = client.post("/search", data={"reference_id": item_id, "text": "make it red", "k": "3"})
            assert by_id.status_code == 200, (item_id, by_id.text)
            assert item_id not in [hit["item_id"] for hit in by_id.json()["hits"]]  # it was read as this very item


@pytest.mark.parametrize("batch_size", ["1", "2", "64"])
def test_files_sharing_an_id_are_named_together_and_the_rest_is_built(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], batch_size: str
) -> None:
    images = tmp_path / "images"
    for seed, name in enumerate([b"a.png", b"dup.png", b"dup.jpg", b"z.png"]):
        _write(images, name, _png(seed))
    assert _build(tiny_export, images, tmp_path / "index", "--batch-size", batch_size) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["skipped: 'dup.jpg', 'dup.png': all would be item id 'dup'; rename all but one"]
    assert Gallery.load(tmp_path / "index", encoder=None).ids == ["a", "z"]


@pytest.mark.parametrize("item_id", ["a\u202eb", "zero\u200bwidth", "nb\xa0sp", "bad\udcffname", "line\u2028sep", "x\u2066y"])
def test_the_grammar_refuses_invisible_and_look_alike_characters(item_id: str) -> None:
    with pytest.raises(InputError, match=f"U\\+{ord(next(c for c in item_id if not c.isalnum())):04X}"):
        validate_item_id(item_id)


@pytest.mark.parametrize(("filename", "item_id"), [
    ("../../evil.png", "evil"), ("a/b.png", "b"), ("C:\\fakepath\\x.png", "x"), ("shoe 1.jpeg", "shoe 1"), ("x.tar.gz", "x.tar"),
])
def test_an_upload_is_named_by_its_last_segment_without_extension(filename: str, item_id: str) -> None:
    assert upload_item_id(filename) == item_id


@pytest.mark.parametrize("filename", ["", "..", "dir/", " lead.png", "rlo\u202e.png"])
def test_an_upload_name_that_gives_no_valid_id_is_refused(filename: str) -> None:
    with pytest.raises(InputError, match="item id"):
        upload_item_id(filename)
