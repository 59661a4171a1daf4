"""A zero-shot (Pic2Word) export through the torch-free runtime: Retriever, ``compir search`` / ``index build`` /
``eval``, the HTTP service on a real uvicorn server, and the demo's search, with the user-facing API unchanged."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from compir.cli import main
from compir.data.load import load_split
from compir.errors import ContractError, InputError
from compir.images import load_image
from compir.manifest import load_manifest
from compir.prompts import DEFAULT_TEMPLATE
from compir.runtime.gallery import Gallery
from compir.runtime.retriever import Retriever
from compir.service.app import create_app
from compir.service.config import BatchingConfig, ServiceConfig
from compir.service.engine import ServiceEngine
from compir.service.server import BackgroundServer
from tests.fixtures.service import KEY, LIMITS, free_port, hits_of, png_bytes


@pytest.fixture(scope="module")
def retriever(zs_export: Path, zs_index: Path) -> Retriever:
    return Retriever.from_dirs(zs_export, zs_index, providers=["cpu"])


@pytest.fixture(scope="module")
def query(synth_data: Path):  # type: ignore[no-untyped-def]
    return load_split(synth_data, split="test").queries[0]


def _query_vector(retriever: Retriever, features: np.ndarray, text: str) -> np.ndarray:
    return retriever.encoder.compose_texts(features[None], [text])[0]


def test_composed_search_by_id_reuses_the_cached_features_and_costs_a_map_and_one_prompt(retriever: Retriever, query, synth_data) -> None:
    by_id = retriever.search_detailed(reference_id=query.reference, text=query.text, k=5)
    assert set(by_id.timings_ms) == {"tokenize", "token_map", "prompt_encode", "search"}  # no image encode, no text encode
    assert query.reference not in [h.item_id for h in by_id.hits]
    cached = retriever.gallery.features_of([query.reference])[0]
    image = load_split(synth_data, split="test").image_path(query.reference)
    encoded = retriever.encoder.encode_images([load_image(image)])
    np.testing.assert_allclose(cached, encoded.image_features[0], atol=1e-5)  # the raw pooled embedding, cached at build
    by_image = retriever.search_detailed(reference_image=image, text=query.text, k=6)
    assert {"image_encode", "token_map", "prompt_encode"} <= set(by_image.timings_ms) and "text_encode" not in by_image.timings_ms
    assert [h.item_id for h in by_image.hits if h.item_id != query.reference][:5] == [h.item_id for h in by_id.hits]
    # the score is the cosine of the gallery vector (the normalised image embedding) to the prompt's query vector
    top = retriever.gallery.features_of([by_id.hits[0].item_id])[0]
    expected = float(top @ _query_vector(retriever, cached, query.text) / np.linalg.norm(top))
    assert abs(by_id.hits[0].score - expected) < 1e-2  # the index stores f16 vectors


def test_text_only_search_uses_the_text_cache_as_before(retriever: Retriever) -> None:
    first = retriever.search_detailed(text="three red circles", k=3)
    again = retriever.search_detailed(text="three red circles", k=3)
    assert "text_encode" in first.timings_ms and "text_encode" not in again.timings_ms and first.hits == again.hits
    assert "token_map" not in first.timings_ms


def test_search_batch_matches_single_searches(retriever: Retriever, query, synth_data) -> None:
    image = load_split(synth_data, split="test").image_path(query.reference)
    queries = [{"text": query.text, "reference_id": query.reference}, {"text": "a red circle"},
               {"text": "make it blue", "reference_image": str(image)}]
    batch = retriever.search_batch(queries, k=4)
    singles = [retriever.search(**q, k=4) for q in queries]  # type: ignore[arg-type]
    for got, expected in zip(batch, singles, strict=True):
        assert [h.item_id for h in got] == [h.item_id for h in expected]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-4)


def test_a_placeholder_in_the_text_never_becomes_a_second_one(retriever: Retriever, query) -> None:
    ids = retriever.encoder.prompt_ids(["add a * sign", "** stars **"])
    assert (ids == retriever.encoder.composition.placeholder_id).sum(axis=1).tolist() == [1, 1]
    starred = retriever.search(reference_id=query.reference, text="add a * sign", k=5)
    plain = retriever.search(reference_id=query.reference, text="add a   sign", k=5)
    assert starred == plain


def test_the_template_can_change_at_query_time_and_a_bad_one_is_refused(zs_export: Path, zs_index: Path, retriever: Retriever,
                                                                       micro_export: Path, query) -> None:
    other = Retriever.from_dirs(zs_export, zs_index, providers=["cpu"], prompt_template="a * that is {modification}")
    features = retriever.gallery.features_of([query.reference])[0]
    assert other.encoder.template is not None and other.encoder.template.fill("red") == "a * that is red"
    assert float(np.abs(_query_vector(other, features, query.text) - _query_vector(retriever, features, query.text)).max()) > 1e-3
    for template, reason in [("a photo of , {modification}", "is missing"), ("* and * {modification}", "appears 2 times")]:
        with pytest.raises(InputError, match=reason) as refused:
            Retriever.from_dirs(zs_export, zs_index, providers=["cpu"], prompt_template=template)
        assert "\n" not in str(refused.value)
    with pytest.raises(InputError, match="learned composer"):
        Retriever.from_dirs(micro_export, zs_index, providers=["cpu"], prompt_template=DEFAULT_TEMPLATE)
    late = Retriever.from_dirs(zs_export, zs_index, providers=["cpu"], prompt_template="{modification} like *")
    with pytest.raises(InputError, match="placeholder token was cut off"):
        late.search(reference_id=query.reference, text=" ".join(["red"] * 30))
    with pytest.raises(ContractError, match="no composer graph"):
        retriever.encoder.compose(features[None], features[None])


def test_search_cli_timings_say_the_text_cache_cannot_apply(zs_export: Path, zs_index: Path, query,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(zs_export), str(zs_index), "--reference-id", query.reference, "--text", "make it red",
                 "--timings", "--providers", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "text cache: n/a (zero-shot: the prompt holds the reference's token" in out and "prompt_encode" in out
    assert main(["search", str(zs_export), str(zs_index), "--text", "a red circle", "--timings", "--json", "--providers", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["timings"] == "warm (second run of this query, text not cached)"
    assert main(["search", str(zs_export), str(zs_index), "--reference-id", query.reference, "--text", "x",
                 "--prompt-template", "no placeholder {modification}"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "the placeholder word '*' is missing" in error
    for command in ("serve", "demo"):  # refused before a server starts
        assert main([command, str(zs_export), str(zs_index), "--port", str(free_port()), "--prompt-template", "* * {modification}"]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "appears 2 times" in error, (command, error)


def test_index_build_and_eval_on_a_zero_shot_export(zs_export: Path, zs_index: Path, synth_data: Path, tmp_path: Path) -> None:
    gallery = Gallery.load(zs_index, encoder=load_manifest(zs_export).encoder_fingerprint())
    assert len(gallery) == len(list((synth_data / "images").glob("*.png"))) and gallery.feature_shape == (64,)
    report = tmp_path / "eval.json"
    assert main(["eval", str(zs_export), "--data", str(synth_data), "--split", "test", "--json", str(report), "--no-progress"]) == 0
    recorded = json.loads(report.read_text())
    assert "R@10" in json.dumps(recorded)


@pytest.fixture(scope="module")
def served(zs_export: Path, zs_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Retriever]]:
    import httpx

    index = tmp_path_factory.mktemp("zs-service") / "index"
    shutil.copytree(zs_index, index)
    retriever = Retriever.from_dirs(zs_export, index, providers=["cpu"], prompt_template="a * that is {modification}")
    engine = ServiceEngine(retriever, config=ServiceConfig(limits=LIMITS, batching=BatchingConfig(wait_ms=5), api_key=KEY))
    engine.warm_up()
    with BackgroundServer(create_app(engine)) as server:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30) as client:
            yield client, retriever


def test_the_http_api_serves_a_zero_shot_export(served, query) -> None:  # type: ignore[no-untyped-def]
    client, retriever = served
    by_id = hits_of(client.post("/search", data={"text": query.text, "reference_id": query.reference, "k": 4}))
    assert [i for i, _ in by_id] == [h.item_id for h in retriever.search(reference_id=query.reference, text=query.text, k=4)]
    upload = hits_of(client.post("/search", files={"reference": ("ref.png", png_bytes(noise=True), "image/png")},
                                 data={"text": "make it red", "k": 3}))
    assert len(upload) == 3
    text_only = hits_of(client.post("/search/text", json={"text": "a red circle", "k": 3}))
    assert len(text_only) == 3
    batch = client.post("/search/batch", json={"k": 4, "queries": [{"text": query.text, "reference_id": query.reference},
                                                                   {"text": "a red circle"}]})
    assert batch.status_code == 200, batch.text
    assert [h["item_id"] for h in batch.json()["results"][0]] == [i for i, _ in by_id]


def test_the_demo_search_reports_that_the_text_cache_cannot_apply(zs_export: Path, zs_index: Path, query,
                                                                 tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from compir.demo.app import _search
    from compir.demo.session import ActiveReference, DemoSession

    index = tmp_path / "index"
    shutil.copytree(zs_index, index)
    session = DemoSession(zs_export, index, prompt_template="a photo of * that {modification}")
    reference = ActiveReference(kind="gallery", item_id=query.reference)
    _, rows, latency, status = _search(session, reference, query.text, 5, False, False)
    expected = session.retriever.search(reference_id=query.reference, text=query.text, k=5)
    assert [row[1] for row in rows] == [h.item_id for h in expected] and "(composed" in status
    assert "text cache n/a (zero-shot: the prompt holds the reference's token" in latency and "compose" in latency
    _, _, latency, _ = _search(session, None, "a red circle", 5, False, True)
    assert "n/a" not in latency
    session.retriever.close()
