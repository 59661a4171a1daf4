"""The HTTP API: the real app under uvicorn on 127.0.0.1, the real tiny export and index, httpx."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from compir.runtime import rerank
from compir.runtime.retriever import Retriever
from compir.service.app import create_app
from compir.service.config import BatchingConfig, ServiceConfig
from compir.service.engine import ServiceEngine
from compir.service.server import BackgroundServer
from tests.fixtures.service import KEY, LIMITS, assert_refused, free_port, hits_of, png_bytes, start_serve, stop_serve


# ---- ops ------------------------------------------------------------------------------------------
def test_health_ready_and_openapi(served):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}  # no key needed
    ready = httpx.get(served.url + "/ready").json()
    assert ready == {"ready": True, "count": len(served.retriever)}
    paths = served.client.get("/openapi.json").json()["paths"]
    for path in ("/search", "/search/text", "/search/batch", "/gallery/items", "/gallery/count", "/gallery/remove", "/stats"):
        assert path in paths


def test_api_key_is_required_and_checked(served):
    assert_refused(httpx.get(served.url + "/gallery/count"), 401, "missing API key", "X-API-Key")
    assert_refused(httpx.get(served.url + "/gallery/count", headers={"X-API-Key": "nope"}), 401, "wrong API key")
    assert served.client.get("/gallery/count").status_code == 200


def test_stats_report_backend_limits_batching_and_latency(served, query):
    served.client.post("/search", data={"text": query.text, "reference_id": query.reference, "k": 3})
    stats = served.client.get("/stats").json()
    assert stats["count"] == len(served.retriever)
    assert stats["backend"]["backend"] == "onnxruntime"
    assert "CPUExecutionProvider" in str(stats["backend"]["providers"])
    assert stats["config"]["limits"]["max_k"] == LIMITS.max_k
    assert stats["config"]["batching"] == {"enabled": True, "max_batch": 16, "wait_ms": 5.0, "reason": "configured"}
    assert stats["config"]["auth"] == "api-key" and KEY not in str(stats)
    rows = {row["endpoint"]: row for row in stats["latency"]}
    search = rows["POST /search"]
    assert search["requests"] >= 1 and 0 < search["p50_ms"] <= search["p90_ms"] <= search["p99_ms"]


# ---- search -------------------------------------------------------------------------------------
def test_search_by_upload_returns_what_the_runtime_returns(served, query, synth_data):
    reference = (served.images / f"{query.reference}.png").read_bytes()
    response = served.client.post("/search", files={"reference": ("ref.png", reference, "image/png")},
                                  data={"text": query.text, "k": "5"})
    got = hits_of(response)
    expected = served.retriever.search(reference_image=reference, text=query.text, k=5)
    assert [i for i, _ in got] == [h.item_id for h in expected]
    assert np.allclose([s for _, s in got], [h.score for h in expected], atol=1e-5)
    assert response.json()["timings_ms"]


def test_search_by_id_text_only_and_batch_agree_with_the_runtime(served, query):
    by_id = hits_of(served.client.post("/search", data={"text": query.text, "reference_id": query.reference, "k": 4}))
    assert [i for i, _ in by_id] == [h.item_id for h in served.retriever.search(reference_id=query.reference, text=query.text, k=4)]
    text_only = hits_of(served.client.post("/search/text", json={"text": "a red circle", "k": 3}))
    assert [i for i, _ in text_only] == [h.item_id for h in served.retriever.search(text="a red circle", k=3)]
    assert hits_of(served.client.post("/search", data={"text": "a red circle", "k": 3})) == text_only
    image_b64 = base64.b64encode((served.images / f"{query.reference}.png").read_bytes()).decode()
    batch = served.client.post("/search/batch", json={"k": 4, "queries": [
        {"text": query.text, "reference_id": query.reference},
        {"text": "a red circle"},
        {"text": query.text, "reference_image_b64": image_b64},
    ]})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [h["item_id"] for h in results[0]] == [i for i, _ in by_id]
    assert [h["item_id"] for h in results[1]][:3] == [i for i, _ in text_only]
    assert len(results[2]) == 4


def test_rerank_without_a_reranker_is_refused(served, query):
    if served.retriever.has_reranker:
        pytest.skip("the tiny export has a re-ranker; the refusal does not apply")
    response = served.client.post("/search", data={"text": query.text, "reference_id": query.reference, "rerank": "true"})
    assert_refused(response, 422, "re-ranker")


class _ReverseReranker:
    """A real second stage registered through the runtime's hook: prefers what stage 1 ranked last."""

    name = "reverse"

    def rerank(self, query, candidates) -> np.ndarray:
        return -candidates.scores


def test_rerank_runs_alone_and_reorders(tiny_export, tiny_index, monkeypatch):
    monkeypatch.setitem(rerank._FACTORIES, "reverse", lambda encoder, manifest, variant: _ReverseReranker())
    retriever = Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])
    retriever.rerank_top_n = 6
    item = retriever.item_ids()[3]
    engine = ServiceEngine(retriever, config=ServiceConfig(batching=BatchingConfig(enabled=True)))
    with BackgroundServer(create_app(engine)) as server:
        form = {"text": "make it red", "reference_id": item, "k": "6"}
        plain = httpx.post(server.url + "/search", data=form)
        reranked = httpx.post(server.url + "/search", data={**form, "rerank": "true"})
        assert httpx.get(server.url + "/stats").json()["has_reranker"] is True
    assert [i for i, _ in hits_of(reranked)] == [i for i, _ in reversed(hits_of(plain))]
    assert "rerank" in reranked.json()["timings_ms"] and reranked.json()["batch_size"] == 1
    assert plain.json()["timings_ms"].keys() == {"batch"}  # the plain query went through the batcher


def _corrupt() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"garbage" * 10


def _png_reference(data: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {"reference": ("a.png", data, "image/png")}


BAD_SEARCHES = [
    ("corrupt image", {"files": {"reference": ("a.png", _corrupt(), "image/png")}, "data": {"text": "x"}}, 422, "reference"),
    ("truncated image", {"files": _png_reference(png_bytes(noise=True)[:300]), "data": {"text": "x"}}, 422, "reference"),
    ("zero-byte image", {"files": {"reference": ("a.png", b"", "image/png")}, "data": {"text": "x"}}, 422, "empty"),
    ("not an image", {"files": {"reference": ("a.txt", b"hello world", "text/plain")}, "data": {"text": "x"}}, 422, "not a readable image"),
    ("too many pixels", {"files": _png_reference(png_bytes((300, 300))), "data": {"text": "x"}}, 413, "max_image_pixels"),
    ("too many bytes", {"files": _png_reference(png_bytes((200, 200), noise=True)), "data": {"text": "x"}}, 413, "max_upload_bytes"),
    ("empty text", {"data": {"text": "", "reference_id": "@first"}}, 422, "text is empty"),
    ("blank text", {"data": {"text": "   ", "k": 3}}, 422, "text is empty"),
    ("overlong text", {"data": {"text": "y" * 201}}, 422, "max_text_chars=200"),
    ("unknown id", {"data": {"text": "x", "reference_id": "no-such-item"}}, 404, "no-such-item"),
    ("a path as id", {"data": {"text": "x", "reference_id": "/etc/passwd"}}, 422, "absolute path"),
    ("k zero", {"data": {"text": "x", "k": 0}}, 422, "max_k=20"),
    ("k negative", {"data": {"text": "x", "k": -3}}, 422, "k=-3"),
    ("k too large", {"data": {"text": "x", "k": 21}}, 422, "max_k=20"),
    ("k not a number", {"data": {"text": "x", "k": "many"}}, 422, "k:"),
    ("upload and id", {"files": _png_reference(png_bytes()), "data": {"text": "x", "reference_id": "@first"}}, 422, "either"),
]


@pytest.mark.parametrize("case", BAD_SEARCHES, ids=[c[0] for c in BAD_SEARCHES])
def test_bad_search_inputs_are_4xx_with_a_message(served, case):
    _, request, status, fragment = case
    data = {key: (served.retriever.item_ids()[0] if value == "@first" else value) for key, value in request["data"].items()}
    response = served.client.post("/search", data=data, files=request.get("files"))
    assert_refused(response, status, fragment)


def test_bad_bodies_and_content_types_are_4xx(served):
    malformed = served.client.post("/search", content=b"--b\r\nContent-Disposition: form-data\r\n\r\nx",
                                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert 400 <= malformed.status_code < 500 and malformed.json()["detail"]
    no_boundary = served.client.post("/search", content=b"abc", headers={"content-type": "multipart/form-data"})
    assert 400 <= no_boundary.status_code < 500 and no_boundary.json()["detail"]
    assert_refused(served.client.post("/search", json={"text": "x"}), 415, "multipart/form-data")
    assert_refused(served.client.post("/search/text", data={"text": "x"}), 415, "application/json")
    assert_refused(served.client.post("/search/text", content=b"{not json", headers={"content-type": "application/json"}), 422, "JSON")
    assert_refused(served.client.post("/search/text", json={"k": 3}), 422, "text")
    too_many = {"k": 2, "queries": [{"text": "x"}] * 9}
    assert_refused(served.client.post("/search/batch", json=too_many), 413, "max_batch_queries=8")
    bad_b64 = {"queries": [{"text": "x", "reference_image_b64": "%%%"}]}
    assert_refused(served.client.post("/search/batch", json=bad_b64), 422, "base64")
    huge = served.client.post("/gallery/items", content=b"x" * (LIMITS.max_request_bytes + 1),
                              headers={"content-type": "multipart/form-data; boundary=b"})
    assert_refused(huge, 413, "max_request_bytes")


def _multipart(boundary: str, text: str, image: bytes) -> tuple[bytes, bytes, bytes]:
    """(text part, file part, close delimiter) of a /search form, written by hand."""
    text_part = f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{text}\r\n'.encode()
    file_part = (f'--{boundary}\r\nContent-Disposition: form-data; name="reference"; filename="a.png"\r\n'
                 "Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n"
    return text_part, file_part, f"--{boundary}--\r\n".encode()


def test_a_multipart_body_cut_short_is_a_400_not_a_text_only_search(served):
    image = png_bytes(noise=True)
    text_part, file_part, close = _multipart("cutHERE", "make it red", image)
    headers = {"content-type": "multipart/form-data; boundary=cutHERE"}
    whole = served.client.post("/search", content=text_part + file_part + close, headers=headers)
    expected = served.retriever.search(reference_image=image, text="make it red", k=10)
    assert [i for i, _ in hits_of(whole)] == [h.item_id for h in expected]  # the upload was used
    for cut in (text_part + file_part, text_part + file_part[: len(file_part) // 2], text_part + file_part + close[:-4]):
        assert_refused(served.client.post("/search", content=cut, headers=headers), 400, "cut short", "--cutHERE--")


def test_empty_or_mistyped_fields_are_422_naming_the_field(served, query):
    batch = {"k": 3, "queries": [{"text": "a red circle"}, {"text": query.text, "reference_image_b64": ""}]}
    assert_refused(served.client.post("/search/batch", json=batch), 422, "queries[1].reference_image_b64", "empty")
    batch["queries"][1] = {"text": query.text, "reference_id": ""}
    assert_refused(served.client.post("/search/batch", json=batch), 422, "queries[1].reference_id", "empty")
    for k in (True, 2.0, "2"):
        assert_refused(served.client.post("/search/text", json={"text": "a red circle", "k": k}), 422, "k:")
        assert_refused(served.client.post("/search/batch", json={"k": k, "queries": [{"text": "x"}]}), 422, "k:")
    for field in ("k", "rerank", "reference_id"):
        assert_refused(served.client.post("/search", data={"text": "a red circle", field: ""}), 422, f"{field!r}", "empty")


@pytest.mark.parametrize("text", ["\x00", "\x7f", "\ufeff", "&nbsp;", "&#32;"])
def test_text_the_tokenizer_reduces_to_nothing_is_a_422(served, query, text):
    assert_refused(served.client.post("/search/text", json={"text": text}), 422, "text is empty")
    assert_refused(served.client.post("/search", data={"text": text, "reference_id": query.reference}), 422, "text is empty")
    batch = {"queries": [{"text": "a red circle"}, {"text": text}]}
    assert_refused(served.client.post("/search/batch", json=batch), 422, "queries[1].text is empty")


# ---- gallery ------------------------------------------------------------------------------------
def test_adding_an_existing_id_is_a_409_unless_replace(served):
    existing = served.retriever.item_ids()[1]
    before = served.client.get("/gallery/count").json()["count"]
    by_name = [("files", ("fresh-one.png", png_bytes((32, 32)), "image/png")),
               ("files", (f"{existing}.png", png_bytes((32, 32)), "image/png"))]
    assert_refused(served.client.post("/gallery/items", files=by_name), 409, "already in the gallery", existing)
    by_id = [("files", ("x.png", png_bytes((36, 36)), "image/png"))]
    assert_refused(served.client.post("/gallery/items", files=by_id, data={"ids": [existing]}), 409, existing)
    assert served.client.get("/gallery/count").json()["count"] == before  # nothing half-added
    assert "fresh-one" not in served.retriever.item_ids()
    replaced = served.client.post("/gallery/items", files=by_id, data={"ids": [existing], "replace": "true"})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json() == {"added": [], "replaced": [existing], "count": before}  # the demo's word too
    image = served.client.get(f"/gallery/items/{existing}/image")
    assert Image.open(io.BytesIO(image.content)).size == (36, 36)


@pytest.mark.parametrize("item_id", ["../escape", "a/../b", "/abs", "a\\b", "a//b", "trailing/", "tab\there"])
def test_item_ids_outside_the_grammar_are_a_422(served, item_id):
    before = served.client.get("/gallery/count").json()["count"]
    files = [("files", ("x.png", png_bytes(), "image/png"))]
    assert_refused(served.client.post("/gallery/items", files=files, data={"ids": [item_id]}), 422, "item id", "relative paths")
    assert served.client.get("/gallery/count").json()["count"] == before


def test_gallery_add_list_fetch_and_remove(served):
    before = served.client.get("/gallery/count").json()["count"]
    files = [("files", ("added-a.png", png_bytes((32, 32)), "image/png")),
             ("files", ("added-b.png", png_bytes((48, 48)), "image/png"))]
    added = served.client.post("/gallery/items", files=files)
    assert added.status_code == 200, added.text
    assert added.json() == {"added": ["added-a", "added-b"], "replaced": [], "count": before + 2}
    page = served.client.get("/gallery/items", params={"offset": before, "limit": 10}).json()
    assert page["total"] == before + 2 and page["items"] == ["added-a", "added-b"]
    image = served.client.get("/gallery/items/added-b/image")
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (48, 48)
    assert served.client.request("DELETE", "/gallery/items/added-a").json() == {"removed": 1, "count": before + 1}
    assert served.client.post("/gallery/remove", json={"ids": ["added-b"]}).json() == {"removed": 1, "count": before}
    assert_refused(served.client.request("DELETE", "/gallery/items/added-a"), 404, "added-a")
    assert_refused(served.client.post("/gallery/remove", json={"ids": ["never-there"]}), 404, "never-there")
    assert_refused(served.client.get("/gallery/items/never-there/image"), 404, "never-there")
    assert served.client.get("/gallery/count").json()["count"] == before


def test_upload_file_names_become_ids_by_their_last_segment(served):
    before = served.client.get("/gallery/count").json()["count"]
    files = [("files", ("../../evil-upload.png", png_bytes((32, 32)), "image/png")),
             ("files", ("sub/dir/b-upload.png", png_bytes((40, 40)), "image/png")),
             ("files", ("dir\\c-upload.png", png_bytes((48, 48)), "image/png"))]  # a Windows path
    added = served.client.post("/gallery/items", files=files)
    assert added.status_code == 200, added.text
    assert added.json()["added"] == ["evil-upload", "b-upload", "c-upload"]  # compir.runtime.uploads.upload_item_id, as the demo
    assert served.client.post("/gallery/remove", json={"ids": ["evil-upload", "b-upload", "c-upload"]}).json()["count"] == before
    invisible = [("files", ("rlo\u202egnp.png", png_bytes(), "image/png"))]
    assert_refused(served.client.post("/gallery/items", files=invisible), 422, "U+202E")


def test_bad_gallery_uploads_add_nothing(served):
    before = served.client.get("/gallery/count").json()["count"]
    mixed = [("files", ("good.png", png_bytes(), "image/png")), ("files", ("bad.png", _corrupt(), "image/png"))]
    assert_refused(served.client.post("/gallery/items", files=mixed), 422, "bad.png")
    twice = [("files", ("same.png", png_bytes(), "image/png"))] * 2
    assert_refused(served.client.post("/gallery/items", files=twice), 422, "twice")
    assert_refused(served.client.post("/gallery/items", files=[("files", ("x.png", png_bytes(), "image/png"))],
                                      data={"ids": ["a", "b"]}), 422, "one id per file")
    nine = [("files", (f"n{i}.png", png_bytes(), "image/png")) for i in range(9)]
    assert_refused(served.client.post("/gallery/items", files=nine), 413, "max_batch_queries=8")
    assert_refused(served.client.get("/gallery/items", params={"limit": 0}), 422, "limit")
    assert served.client.get("/gallery/count").json()["count"] == before


# ---- concurrency --------------------------------------------------------------------------------
def test_concurrent_searches_and_writes_lose_nothing(served, query):
    clients, per_client = 8, 25
    before = served.client.get("/gallery/count").json()["count"]
    batches_before = served.client.get("/stats").json()["batching_stats"]["batches"]
    upload = png_bytes((40, 40))

    def work(client_no: int) -> list[int]:
        codes = []
        with httpx.Client(base_url=served.url, headers={"X-API-Key": KEY}, timeout=60) as client:
            for n in range(per_client):
                if n % 12 == 5:  # two writes per client, interleaved with the searches
                    r = client.post("/gallery/items", files=[("files", (f"c{client_no}-{n}.png", upload, "image/png"))])
                elif n % 2:
                    r = client.post("/search", data={"text": query.text, "reference_id": query.reference, "k": 5})
                else:
                    r = client.post("/search/text", json={"text": f"a shape number {n}", "k": 5})
                codes.append(r.status_code)
        return codes

    with ThreadPoolExecutor(clients) as pool:
        codes = [code for result in pool.map(work, range(clients)) for code in result]
    assert codes.count(200) == clients * per_client, sorted(set(codes))
    assert served.client.get("/gallery/count").json()["count"] == before + 2 * clients
    stats = served.client.get("/stats").json()["batching_stats"]
    assert stats["max_batch_seen"] > 1  # concurrent searches shared model calls
    assert stats["batches"] > batches_before
    reopened = Retriever.from_dirs(served.retriever.encoder.export_dir, served.index_dir, providers=["cpu"])
    assert len(reopened) == before + 2 * clients  # every write is on disk


# ---- the CLI: a restart keeps what was added -----------------------------------------------------
def test_cli_serves_and_a_restart_keeps_added_items(tiny_export, tiny_index, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(tiny_index, index)
    port = free_port()
    first = start_serve(tiny_export, index, port)
    try:
        url = f"http://127.0.0.1:{port}"
        before = httpx.get(url + "/gallery/count").json()["count"]
        files = [("files", (f"kept-{i}.png", png_bytes((30 + i, 30)), "image/png")) for i in range(3)]
        assert httpx.post(url + "/gallery/items", files=files).status_code == 200
        assert httpx.get(url + "/stats").json()["config"]["batching"]["enabled"] is False
    finally:
        log = stop_serve(first)
    assert "dynamic batching off" in log and "127.0.0.1" in log
    second = start_serve(tiny_export, index, port)
    try:
        page = httpx.get(f"http://127.0.0.1:{port}/gallery/items", params={"offset": before, "limit": 10}).json()
        assert page["total"] == before + 3 and page["items"] == ["kept-0", "kept-1", "kept-2"]
    finally:
        stop_serve(second)


def test_service_imports_no_model_code():
    code = (
        "import importlib, pkgutil, sys, compir.service\n"
        "names = [m.name for m in pkgutil.walk_packages(compir.service.__path__, 'compir.service.')]\n"
        "assert 'compir.service.app' in names and 'compir.service.cli' in names, names\n"
        "for name in names: importlib.import_module(name)\n"
        "bad = [m for m in ('torch', 'open_clip', 'gradio', 'onnx', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
