"""Item ids never become Milvus expression syntax (issue 23, item 1): the filter builder against
Milvus Lite's own parser; then, on a Milvus Lite file and on a Milvus server (``milvus_uri``), the
store with ids holding quotes, backslashes and newlines (listing them too: pymilvus's own query
iterator quotes the last id of a page unescaped), the HTTP API with an injection payload, and
`compir index build` on a folder holding ``John's photo.png``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compir.cli import main as compir_main
from compir.errors import DuplicateItemError
from compir.runtime.gallery import Gallery
from compir.runtime.retriever import Retriever
from compir.service.app import create_app
from compir.service.config import BatchingConfig, ServiceConfig
from compir.service.engine import ServiceEngine
from compir.service.server import BackgroundServer
from tests.fixtures.service import KEY, LIMITS, png_bytes

pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")

from milvus_lite.search.filter import parse_expr  # noqa: E402  (after the skip)

from compir.runtime.milvus_store import in_filter  # noqa: E402

TARGET = "target"  # an item of the gallery below (a copy of a synthetic image)
PAYLOAD = f"zz', '{TARGET}"  # quoted unescaped (as pymilvus's ids= does), it closes the literal and names TARGET
HOSTILE = ["it's", 'say "hi"', "back\\slash", "new\nline", "cr\rtab\t", PAYLOAD, f'zz", "{TARGET}', "ends with \\"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40), max_size=5))
def test_the_filter_builder_yields_exactly_the_values_for_milvus_lites_parser(values: list[str]) -> None:
    parsed = parse_expr(in_filter("id", values))
    assert parsed.field.name == "id" and [element.value for element in parsed.values.elements] == values


def test_the_filter_builder_writes_integers_as_integers_and_refuses_other_values() -> None:
    parsed = parse_expr(in_filter("claim", [3, -7, 2**62]))  # the claims' auto-id primary keys (milvus_claims)
    assert parsed.field.name == "claim" and [element.value for element in parsed.values.elements] == [3, -7, 2**62]
    for bad in (True, 1.5, None, b"id"):
        with pytest.raises(TypeError, match="must be a str or an int"):
            in_filter("claim", [bad])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def hostile_index(tiny_export: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory, milvus_uri: str) -> Path:
    """`compir index build --milvus-uri` on 6 synthetic images, ``target.png`` and ``John's photo.png`` (the same image)."""
    root = tmp_path_factory.mktemp("hostile")
    images = root / "images"
    images.mkdir()
    sources = sorted((synth_data / "images").iterdir())[:7]
    for source in sources[:6]:
        shutil.copyfile(source, images / source.name)
    for name in (f"{TARGET}.png", "John's photo.png"):
        shutil.copyfile(sources[6], images / name)
    argv = ["index", "build", str(tiny_export), "--images", str(images), "--out", str(root / "index"),
            "--milvus-uri", milvus_uri, "--collection", "hostile", "--quiet", "--workers", "1"]
    assert compir_main(argv) == 0
    return root / "index"


def test_index_build_and_search_by_id_on_a_file_name_with_a_quote(tiny_export: Path, hostile_index: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert json.loads((hostile_index / "index.json").read_text())["count"] == 8
    capsys.readouterr()
    argv = ["search", str(tiny_export), str(hostile_index), "--reference-id", "John's photo", "--text", "make it red",
            "--json", "--providers", "cpu"]
    assert compir_main(argv) == 0
    hits = [hit["item_id"] for hit in json.loads(capsys.readouterr().out)["hits"]]
    assert "John's photo" not in hits and TARGET in hits  # the reference is left out, its twin is found


def test_the_store_keeps_hostile_ids_apart(hostile_index: Path) -> None:
    gallery = Gallery.load(hostile_index, encoder=None)
    before = set(gallery.ids)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((len(HOSTILE), gallery.ndim)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    features = rng.standard_normal((len(HOSTILE), *gallery.feature_shape)).astype(np.float32)
    gallery.add(HOSTILE, embeds=embeds, features=features, paths=[f"p{i}" for i in range(len(HOSTILE))], replace=False)
    assert gallery.present([*HOSTILE, "absent"]) == set(HOSTILE) and set(gallery.ids) == before | set(HOSTILE)
    np.testing.assert_array_equal(gallery.features_of(HOSTILE[::-1]), features[::-1])
    assert gallery.store.paths_of(HOSTILE) == [f"p{i}" for i in range(len(HOSTILE))]
    for row, item in enumerate(HOSTILE):
        with pytest.raises(DuplicateItemError):
            gallery.add([item], embeds=embeds[row:row + 1], features=features[row:row + 1], paths=["again"], replace=False)
    hits = gallery.search(embeds[:1], k=3, exclude=[HOSTILE[0]])[0]
    assert HOSTILE[0] not in [item for item, _ in hits]
    assert gallery.remove(HOSTILE) == len(HOSTILE)
    assert set(gallery.ids) == before and TARGET in gallery  # nothing else was removed


@pytest.fixture(scope="module")
def client(tiny_export: Path, hostile_index: Path) -> Iterator[httpx.Client]:
    retriever = Retriever.from_dirs(tiny_export, hostile_index, providers=["cpu"])
    engine = ServiceEngine(retriever, config=ServiceConfig(limits=LIMITS, batching=BatchingConfig(wait_ms=5), api_key=KEY))
    with BackgroundServer(create_app(engine)) as server:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30) as http:
            yield http


@pytest.mark.parametrize("item_id", ["it's", 'say "hi"', PAYLOAD])
def test_http_add_lookup_refusal_reference_and_remove_of_a_quoting_id(client: httpx.Client, item_id: str) -> None:
    count = client.get("/gallery/count").json()["count"]
    files = [("files", ("x.png", png_bytes((40, 40), noise=True), "image/png"))]
    added = client.post("/gallery/items", files=files, data={"ids": [item_id]})
    assert added.status_code == 200 and added.json() == {"added": [item_id], "replaced": [], "count": count + 1}, added.text
    again = client.post("/gallery/items", files=files, data={"ids": [item_id]})
    assert again.status_code == 409 and item_id in again.json()["detail"], again.text
    assert client.get(f"/gallery/items/{item_id}/image").status_code == 200
    by_id = client.post("/search", data={"text": "make it red", "reference_id": item_id, "k": 20})
    assert by_id.status_code == 200, by_id.text
    assert item_id not in [hit["item_id"] for hit in by_id.json()["hits"]]
    removed = client.delete(f"/gallery/items/{item_id}")
    assert removed.status_code == 200, removed.text
    assert client.get("/gallery/count").json()["count"] == count
    assert client.get(f"/gallery/items/{TARGET}/image").status_code == 200  # the item the payload names is untouched
