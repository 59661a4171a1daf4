"""The Milvus index backend: `compir index build --index-backend milvus`, the Retriever and `compir
search` on it, its refusals, and the service's gallery and search tests run against it, each on a
Milvus Lite file and on a Milvus server (``milvus_uri``; the server's own tests, processes sharing
it and its restarts, are in test_milvus_server.py). The gallery behaviour both backends share is
tested in test_index.py (parametrised over backends)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from compir.cli import main as compir_main
from compir.errors import ContractError
from compir.runtime.gallery import Gallery
from compir.runtime.index_cli import main as index_main
from compir.runtime.milvus_store import MAX_PATH_CHARS
from compir.runtime.retriever import Retriever
from compir.runtime.search_cli import main as search_main
from compir.service.app import create_app
from compir.service.config import BatchingConfig, ServiceConfig
from compir.service.engine import ServiceEngine
from compir.service.server import BackgroundServer
from tests.fixtures.service import KEY, LIMITS, Served
from tests.test_service_api import (  # noqa: F401  (pytest collects the imported tests here)
    test_adding_an_existing_id_is_a_409_unless_replace,
    test_bad_gallery_uploads_add_nothing,
    test_concurrent_searches_and_writes_lose_nothing,
    test_gallery_add_list_fetch_and_remove,
    test_search_by_id_text_only_and_batch_agree_with_the_runtime,
    test_search_by_upload_returns_what_the_runtime_returns,
)

pytest.importorskip("pymilvus", reason="the milvus extra is not installed")


@pytest.fixture(scope="module")
def milvus_root(tmp_path_factory: pytest.TempPathFactory, milvus_uri: str) -> Path:
    return tmp_path_factory.mktemp("milvus")  # the index folders (one set per Milvus of milvus_uri)


def build_milvus_index(tiny_export: Path, synth_data: Path, root: Path, uri: str, collection: str) -> Path:
    """The tiny gallery built by the CLI into collection ``collection`` at ``uri``, its folder in ``root``."""
    out = root / collection
    argv = ["build", str(tiny_export), "--images", str(synth_data / "images"), "--out", str(out), "--index-backend", "milvus",
            "--milvus-uri", uri, "--collection", collection, "--quiet", "--workers", "2"]
    assert index_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def milvus_index(tiny_export: Path, synth_data: Path, milvus_root: Path, milvus_uri: str) -> Path:
    """An index folder naming a Milvus collection that the tests here only read."""
    return build_milvus_index(tiny_export, synth_data, milvus_root, milvus_uri, "tiny")


@pytest.fixture(scope="module")
def served(tiny_export: Path, synth_data: Path, milvus_root: Path, milvus_uri: str) -> Iterator[Served]:
    """test_service_api's `served` on a Milvus index of its own (the tests imported above change it)."""
    index_dir = build_milvus_index(tiny_export, synth_data, milvus_root, milvus_uri, "served")
    retriever = Retriever.from_dirs(tiny_export, index_dir, providers=["cpu"])
    engine = ServiceEngine(retriever, config=ServiceConfig(limits=LIMITS, batching=BatchingConfig(wait_ms=5), api_key=KEY))
    with BackgroundServer(create_app(engine)) as server:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30) as client:
            yield Served(server.url, client, retriever, engine, index_dir, synth_data / "images")


def test_index_json_names_the_collection_and_searches_match_usearch(tiny_export: Path, tiny_index: Path, milvus_index: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    record = json.loads((milvus_index / "index.json").read_text())
    assert record["backend"] == "milvus" and record["schema_version"] == 3 and "files" not in record
    assert record["milvus"]["collection"] == "tiny" and ("://" in record["milvus"]["uri"] or Path(record["milvus"]["uri"]).is_absolute())
    assert record["milvus"]["index_type"] == "HNSW" and record["milvus"]["index_params"] == {"M": 16, "efConstruction": 128}
    assert sorted(p.name for p in milvus_index.iterdir()) == ["index.json"]  # the items live in Milvus only
    on_milvus = Retriever.from_dirs(tiny_export, milvus_index, providers=["cpu"])
    on_usearch = Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])
    assert on_milvus.item_ids() == on_usearch.item_ids() and on_milvus.backend_info["index_backend"] == "milvus"
    item = on_usearch.item_ids()[3]
    for request in [{"text": "make it red", "reference_id": item}, {"text": "a blue square"}]:
        got = on_milvus.search(k=5, **request)  # type: ignore[arg-type]
        expected = on_usearch.search(k=5, **request)  # type: ignore[arg-type]
        assert [h.item_id for h in got] == [h.item_id for h in expected]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-4)
    assert search_main([str(tiny_export), str(milvus_index), "--text", "make it red", "--reference-id", item, "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["item_id"] for h in hits] == [h.item_id for h in on_usearch.search(text="make it red", reference_id=item, k=3)]


def test_build_refuses_an_existing_collection_and_a_half_given_backend(tiny_export: Path, synth_data: Path, milvus_index: Path,
                                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = json.loads((milvus_index / "index.json").read_text())["milvus"]["uri"]
    argv = ["index", "build", str(tiny_export), "--images", str(synth_data / "images"), "--out", str(tmp_path / "again"), "--quiet"]
    assert compir_main([*argv, "--index-backend", "milvus", "--milvus-uri", uri, "--collection", "tiny"]) == 2
    assert "collection 'tiny' already exists" in capsys.readouterr().err
    assert compir_main([*argv, "--index-backend", "milvus"]) == 2
    assert compir_main([*argv, "--index-backend", "usearch", "--milvus-uri", uri]) == 2
    assert compir_main([*argv, "--index-backend", "milvus", "--milvus-uri", str(tmp_path / "no.sqlite")]) == 2
    assert "ending in .db" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_a_failed_insert_is_reported_and_adds_nothing(tiny_export: Path, milvus_index: Path) -> None:
    gallery = Gallery.load(milvus_index, encoder=None)
    before, shape = len(gallery), (2, *gallery.feature_shape)
    embeds = np.eye(2, gallery.ndim, dtype=np.float32)
    too_long = "images/" + "x" * MAX_PATH_CHARS  # longer than the collection's path field: Milvus refuses the request
    with pytest.raises(ContractError, match=r"Milvus at .* failed to insert 2 items: .*max.length.*; none was added"):
        gallery.add(["fine-a", "long-b"], embeds=embeds, features=np.zeros(shape, np.float32), paths=["", too_long])
    assert len(gallery) == before and "fine-a" not in gallery and "long-b" not in gallery


def test_unreachable_milvus_a_dropped_collection_and_a_damaged_record_are_clear_errors(milvus_index: Path, tmp_path: Path) -> None:
    record = json.loads((milvus_index / "index.json").read_text())

    def load_with(**milvus: object) -> Gallery:
        folder = tmp_path / f"ix{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "index.json").write_text(json.dumps({**record, "milvus": {**record["milvus"], **milvus}}))
        return Gallery.load(folder, encoder=None)

    with pytest.raises(ContractError, match=r"(cannot open|failed to look up).*127\.0\.0\.1:9"):
        load_with(uri="http://127.0.0.1:9")
    with pytest.raises(ContractError, match="has no collection 'gone'"):
        load_with(collection="gone")
    with pytest.raises(ContractError, match="milvus section is incomplete"):
        load_with(search_params=None)
    shutil.copytree(milvus_index, tmp_path / "missing")
    damaged = {key: value for key, value in record.items() if key != "milvus"}
    (tmp_path / "missing" / "index.json").write_text(json.dumps(damaged))
    with pytest.raises(ContractError, match="missing field.*milvus"):
        Gallery.load(tmp_path / "missing", encoder=None)
