"""The HTTP API reinterprets nothing: unknown, repeated, empty or oddly written fields, bodies cut
short, text that is not UTF-8, decompression bombs and ids outside the grammar are refused with a
4xx naming the problem. The real app under uvicorn on 127.0.0.1, the tiny export and index, httpx."""

from __future__ import annotations

import re
import struct
import zlib
from urllib.parse import quote

import pytest

from tests.fixtures.service import assert_refused, hits_of, png_bytes

MULTIPART = {"content-type": "multipart/form-data; boundary=cutHERE"}


def _text_part(name: str, value: bytes) -> bytes:
    return f'--cutHERE\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"


def _file_part(name: str, filename: str, data: bytes) -> bytes:
    head = f'--cutHERE\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
    return (head + "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"


CLOSE = b"--cutHERE--\r\n"


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` in a few dozen bytes (a decompression bomb's header)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ---- unknown and repeated fields -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["image", "topk", "top_k", "referenceId"])
def test_an_unknown_form_field_is_a_422_naming_it(served, name):
    files = {name: ("q.png", png_bytes(), "image/png")} if name == "image" else None
    data = {"text": "a red circle"} | ({} if files else {name: "5"})
    assert_refused(served.client.post("/search", data=data, files=files), 422, f"unknown form field {name!r}", "reference")
    add = served.client.post("/gallery/items", files=[("files", ("x.png", png_bytes(), "image/png"))], data={name: "1"})
    assert_refused(add, 422, f"unknown form field {name!r}")


def test_an_unknown_json_field_is_a_422_naming_it(served):
    for body in ({"text": "a red circle", "reference_id": "x"}, {"text": "a red circle", "topk": 3}):
        extra = next(key for key in body if key != "text")
        assert_refused(served.client.post("/search/text", json=body), 422, f"{extra}: unknown field")
    batch = {"k": 2, "queries": [{"text": "a red circle", "k": 3}]}
    assert_refused(served.client.post("/search/batch", json=batch), 422, "queries.0.k: unknown field")
    assert_refused(served.client.post("/gallery/remove", json={"ids": ["x"], "force": True}), 422, "force: unknown field")


def test_a_field_sent_twice_is_a_422(served, query):
    for data in ({"text": "a red circle", "k": ["3", "5"]}, {"text": ["a red circle", "a blue square"]}):
        assert_refused(served.client.post("/search", data=data), 422, "more than once")
    two = [("reference", ("a.png", png_bytes(), "image/png")), ("reference", ("b.png", png_bytes(seed=1), "image/png"))]
    assert_refused(served.client.post("/search", data={"text": query.text}, files=two), 422, "'reference' is sent more than once")
    twice = b'{"text": "a red circle", "k": 1, "k": 50}'
    response = served.client.post("/search/text", content=twice, headers={"content-type": "application/json"})
    assert_refused(response, 422, "'k' more than once")


@pytest.mark.parametrize("raw", ["1_0", "1.0", " 5", "+5", "5 ", "0x5", "\u0665", "1e1"])
def test_k_in_a_form_is_plain_decimal_digits(served, raw):
    assert_refused(served.client.post("/search", data={"text": "a red circle", "k": raw}), 422, "k: must be a whole number")


# ---- empty references, non-UTF-8 text, bodies cut short -------------------------------------------
def test_an_empty_reference_is_a_422(served, query):
    no_file = _text_part("text", query.text.encode()) + _file_part("reference", "", b"") + CLOSE
    assert_refused(served.client.post("/search", content=no_file, headers=MULTIPART), 422, "'reference'", "no file was chosen")
    assert_refused(served.client.post("/search", data={"text": query.text, "reference": ""}), 422, "'reference' is empty")


def test_text_that_is_not_utf8_is_a_400(served):
    body = _text_part("text", b"\xff\xfe\xfd") + CLOSE
    assert_refused(served.client.post("/search", content=body, headers=MULTIPART), 400, "'text' is not UTF-8")
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    assert_refused(served.client.post("/search", content=b"text=%FF%FE%FD", headers=urlencoded), 400, "'text' is not UTF-8")


def test_a_body_cut_short_cannot_be_smuggled_past_the_check(served):
    image = png_bytes(noise=True)
    decoy = _text_part("text", b"make it red --cutHERE-- please")  # the close delimiter, inside a value
    whole = served.client.post("/search", content=decoy + _file_part("reference", "a.png", image) + CLOSE, headers=MULTIPART)
    expected = served.retriever.search(reference_image=image, text="make it red --cutHERE-- please", k=10)
    assert [i for i, _ in hits_of(whole)] == [h.item_id for h in expected]  # the value and the upload were both read
    cut_in_file = decoy + _file_part("reference", "a.png", image)[:200]
    assert_refused(served.client.post("/search", content=cut_in_file, headers=MULTIPART), 400, "cut short", "part 2")
    cut_k = decoy + _text_part("k", b"50")[:-3]  # k=50 cut to 5
    assert_refused(served.client.post("/search", content=cut_k, headers=MULTIPART), 400, "cut short", "part 2 ('k')")
    trailing = decoy + CLOSE + b"--cutHERE\r\n"
    assert_refused(served.client.post("/search", content=trailing, headers=MULTIPART), 400, "after its closing boundary")


# ---- images and ids -----------------------------------------------------------------------------
@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 Mpx: over Pillow's warning; 400 Mpx: over its error limit
def test_a_decompression_bomb_is_a_413_naming_the_option(served, side):
    bomb = png_header(side, side)
    response = served.client.post("/search", data={"text": "x"}, files={"reference": ("bomb.png", bomb, "image/png")})
    assert_refused(response, 413, "max_image_pixels", "--max-image-pixels")
    add = served.client.post("/gallery/items", files=[("files", ("bomb.png", bomb, "image/png"))])
    assert_refused(add, 413, "--max-image-pixels")


BAD_IDS = ["x" * 300, "a//b", "tab\there", "/etc/passwd"]


@pytest.mark.parametrize("item_id", BAD_IDS, ids=["300 chars", "empty segment", "tab", "absolute"])
def test_an_id_outside_the_grammar_is_a_422_on_lookups_too(served, item_id):
    assert_refused(served.client.post("/search", data={"text": "x", "reference_id": item_id}), 422, "reference_id", "item id")
    batch = {"queries": [{"text": "x", "reference_id": item_id}]}
    assert_refused(served.client.post("/search/batch", json=batch), 422, "reference_id", "item id")
    assert_refused(served.client.post("/gallery/remove", json={"ids": [item_id]}), 422, "item id")
    if not item_id.startswith("/"):  # in a URL path, a leading / is part of the route
        in_url = quote(item_id, safe="/")
        assert_refused(served.client.get(f"/gallery/items/{in_url}/image"), 422, "item id")
        assert_refused(served.client.request("DELETE", f"/gallery/items/{in_url}"), 422, "item id")


# ---- the docs and the schema ----------------------------------------------------------------------
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_work_offline_and_without_the_key(served, page):
    import httpx

    html = httpx.get(served.url + page)
    assert html.status_code == 200, html.text
    assert not re.findall(r"https?://", html.text), re.findall(r"https?://\S+", html.text)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        assert httpx.get(served.url + asset).status_code == 200, asset  # served here, no key needed
    schema = httpx.get(served.url + "/openapi.json")
    assert schema.status_code == 200
    assert schema.json()["components"]["securitySchemes"]["APIKey"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    assert httpx.get(served.url + "/gallery/count").status_code == 401  # the data still needs it


def test_the_schema_lists_the_error_bodies_really_sent(served):
    schema = served.client.get("/openapi.json").json()
    assert "HTTPValidationError" not in str(schema)
    error = schema["components"]["schemas"]["ErrorOut"]
    assert error["required"] == ["detail"] and error["properties"]["detail"]["type"] == "string"
    search = schema["paths"]["/search"]["post"]
    assert {"400", "401", "404", "413", "415", "422"} <= set(search["responses"])
    assert schema["paths"]["/gallery/items"]["post"]["responses"]["409"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorOut"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut"), (path, method)
    form = search["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"text", "k", "rerank", "reference", "reference_id"}
    assert form["additionalProperties"] is False and form["properties"]["reference"]["format"] == "binary"
    # and what they say is what is sent
    refused = served.client.post("/search", data={"text": "x", "topk": "3"})
    assert set(refused.json()) == {"detail"}
