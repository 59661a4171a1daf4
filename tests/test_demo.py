"""The Gradio demo: the real app on 127.0.0.1, driven through gradio_client and headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from compir.data.load import load_split
from compir.data.types import Query
from compir.errors import InputError
from compir.runtime.retriever import Retriever
from compir.runtime.uploads import upload_item_id
from tests.fixtures.service import free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr_client = pytest.importorskip("gradio_client", reason="gradio_client is part of the dev extra")

from compir.demo.app import id_legend  # noqa: E402
from compir.demo.examples import find_examples  # noqa: E402
from compir.demo.launch import RunningDemo, launch_demo  # noqa: E402  (after the env var)
from compir.demo.session import ActiveReference  # noqa: E402

K = 5
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]



@pytest.fixture(scope="module")
def demo(tiny_export: Path, tiny_index: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    index = tmp_path_factory.mktemp("demo") / "index"
    shutil.copytree(tiny_index, index)  # the page adds images; the session fixture stays intact
    running = launch_demo(tiny_export, index, port=free_port(), examples_dir=synth_data, max_upload_bytes=256 * 1024)
    yield running
    running.close()


@pytest.fixture(scope="module")
def solved(demo: RunningDemo, synth_data: Path) -> tuple[Query, Path]:
    """A test query whose target the runtime ranks in its top K when the reference is uploaded."""
    split = load_split(synth_data, split="test")
    for query in split.queries[:200]:
        reference = split.image_path(query.reference)
        hits = demo.session.retriever.search(reference_image=reference.read_bytes(), text=query.text, k=K)
        if set(query.targets) & {h.item_id for h in hits}:
            return query, reference
    pytest.fail(f"the tiny model ranks no target of the first 200 test queries in its top {K}")


@pytest.fixture(scope="module")
def client(demo: RunningDemo):
    return gr_client.Client(demo.url, verbose=False)


def test_search_through_the_api_shows_what_the_runtime_returns(demo, client, solved):
    query, reference = solved
    tiles, table, latency, status = client.predict(
        gr_client.handle_file(str(reference)), "", query.text, K, False, False, api_name="/search")
    expected = demo.session.retriever.search(reference_image=reference.read_bytes(), text=query.text, k=K)
    assert [row[1] for row in table["data"]] == [h.item_id for h in expected]
    assert set(query.targets) & {row[1] for row in table["data"]}
    assert len(tiles) == K and expected[0].item_id in tiles[0]["caption"]
    assert "encode" in latency and "compose" in latency and "search" in latency and "total" in latency
    assert "(warm)" in latency  # the session warmed every stage up before the first query
    assert f"{K} results (composed" in status


def test_text_only_and_gallery_reference_through_the_api(demo, client, solved):
    query, _ = solved
    _, table, latency, status = client.predict(None, "", "a red circle", 3, False, True, api_name="/search")
    assert [row[1] for row in table["data"]] == [h.item_id for h in demo.session.retriever.search(text="a red circle", k=3)]
    assert "text-only" in status and "compose —" in latency
    _, table, _, _ = client.predict(None, query.reference, query.text, K, False, False, api_name="/search")
    by_id = demo.session.retriever.search(reference_id=query.reference, text=query.text, k=K)
    assert [row[1] for row in table["data"]] == [h.item_id for h in by_id]


def test_bad_uploads_and_inputs_give_messages(client, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    *_, status = client.predict(gr_client.handle_file(str(not_image)), "", "make it red", K, False, False, api_name="/search")
    assert "⚠️" in status and "not a readable image" in status
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(300 * 1024))
    with pytest.raises(Exception, match="(?i)size|large"):
        client.predict(gr_client.handle_file(str(big)), "", "make it red", K, False, False, api_name="/search")
    *_, status = client.predict(None, "", "make it red", K, False, False, api_name="/search")
    assert "choose a reference image" in status
    *_, status = client.predict(None, "no-such-item", "make it red", K, False, False, api_name="/search")
    assert "no-such-item" in status and "does not exist" in status
    *_, status = client.predict(None, "", "   ", K, False, True, api_name="/search")
    assert "text is empty" in status
    *_, status = client.predict(gr_client.handle_file(str(not_image)), "some-id", "make it red", K, False, False, api_name="/search")
    assert "not both" in status


def test_backend_switch_and_gallery_additions_persist(demo, client, synth_data, tmp_path):
    assert "Backend: onnxruntime · CPU" in client.predict(demo.session.backends[-1].label, api_name="/switch_backend")
    before = len(demo.session.retriever)
    sources = sorted((synth_data / "images").glob("*.png"))[:2]
    files = []
    for number, source in enumerate(sources):
        files.append(tmp_path / f"page-added-{number}.png")
        shutil.copy(source, files[-1])
    outputs = client.predict([gr_client.handle_file(str(f)) for f in files], False, 0, api_name="/add_images")
    assert "Added 2 image(s)" in outputs[0] and "page-added-0" in outputs[0]
    reopened = Retriever.from_dirs(demo.session.export_dir, demo.session.index_dir, providers=["cpu"])
    assert len(reopened) == before + 2 and {"page-added-0", "page-added-1"} <= set(reopened.item_ids())
    # Errors land in the add status (the first output), not in the gallery's line.
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    outputs = client.predict([gr_client.handle_file(str(bad))], False, 0, api_name="/add_images")
    assert "⚠️" in outputs[0] and "broken" in outputs[0] and len(demo.session.retriever) == before + 2
    assert "⚠️" not in outputs[-1]
    # An id that exists is refused and named, unless replacing is asked for; then the page says so.
    outputs = client.predict([gr_client.handle_file(str(files[0]))], False, 0, api_name="/add_images")
    assert "⚠️" in outputs[0] and "already in the gallery: page-added-0" in outputs[0]
    assert len(demo.session.retriever) == before + 2
    outputs = client.predict([gr_client.handle_file(str(files[0]))], True, 0, api_name="/add_images")
    assert "replaced 1 existing item(s): page-added-0" in outputs[0] and "Added" not in outputs[0]
    assert len(demo.session.retriever) == before + 2


def test_wording_one_result_and_a_cached_text(client):
    text = "a small cached green square"  # not asked before in this module
    _, _, latency, status = client.predict(None, "", text, 1, False, True, api_name="/search")
    assert status.startswith("1 result (text-only") and "text cached" not in latency and "encode —" not in latency
    _, _, latency, status = client.predict(None, "", text, 2, False, True, api_name="/search")
    assert status.startswith("2 results (") and "text cached" in latency and "encode —" not in latency


def test_added_files_get_their_ids_by_the_service_rule(demo, synth_data, tmp_path):
    odd = tmp_path / "dir\\path-demo.png"  # a Windows path as a file name: only its last segment counts
    shutil.copy(sorted((synth_data / "images").glob("*.png"))[3], odd)
    assert demo.session.add_images([str(odd)]).added == (upload_item_id(odd.name),) == ("path-demo",)
    assert demo.session.retriever.remove_items(["path-demo"]) == 1
    demo.session.retriever.save()


def test_the_id_legend_is_shown_for_synthetic_ids_only(demo, tmp_path):
    legend = id_legend(demo.session.retriever.item_ids()[:8])
    assert "`x` is an empty cell" in legend and "`c` circle" in legend and "`0` red" in legend and "`L` large" in legend
    assert id_legend(["photo-1", "x-x-x-x-c0L-x-x-x-x"]) == "" and id_legend([]) == ""
    with pytest.raises(InputError, match="no dataset split"):  # an examples folder that holds no dataset
        find_examples(demo.session, data_dir=tmp_path)


def test_examples_come_from_the_synthetic_benchmark(demo, synth_data):
    assert demo.examples, "the gallery is synthetic: examples expected"
    texts = {q.text for split in ("train", "val", "test") for q in load_split(synth_data, split=split).queries}
    assert all(example.text in texts for example in demo.examples)


def test_the_active_reference_is_what_search_uses_and_examples_know_their_target(demo, solved):
    query, reference = solved
    session = demo.session
    by_upload = session.search(reference=ActiveReference(kind="upload", path=str(reference)), text=query.text, k=K)
    direct = session.retriever.search(reference_image=reference.read_bytes(), text=query.text, k=K)
    assert [h.item_id for h in by_upload.hits] == [h.item_id for h in direct]
    item = session.retriever.item_ids()[3]
    by_item = session.search(reference=ActiveReference(kind="gallery", item_id=item), text=query.text, k=K)
    assert [h.item_id for h in by_item.hits] == [h.item_id for h in session.retriever.search(reference_id=item, text=query.text, k=K)]
    with pytest.raises(ValueError):
        ActiveReference(kind="upload", item_id=item, path=str(reference))
    with pytest.raises(InputError, match="not both"):
        session.reference_from(upload=str(reference), item_id=item)
    with pytest.raises(InputError, match="choose a reference"):
        session.search(reference=None, text="make it red", k=K)

    example = ActiveReference(kind="example", path=str(reference), targets=query.targets, example_text=query.text)
    answer = session.search(reference=example, text=query.text, k=K)
    ranks = answer.target_ranks()
    assert set(ranks) == set(query.targets) and any(rank is not None and rank <= K for rank in ranks.values())
    edited = session.search(reference=example, text=query.text + " and blue", k=K)
    assert edited.targets == () and edited.target_ranks() == {}  # the target belongs to the example's own text
    missed = session.search(reference=example, text=query.text, k=1)
    assert all(rank is None or rank == 1 for rank in missed.target_ranks().values())


class _ReverseReranker:
    """A real second stage registered through the runtime's hook: prefers what stage 1 ranked last."""

    name = "reverse"

    def rerank(self, query, candidates):
        return -candidates.scores


def test_rerank_is_offered_when_the_export_has_one(tiny_export, tiny_index, monkeypatch):
    from compir.demo.session import DemoSession
    from compir.runtime import rerank

    monkeypatch.setitem(rerank._FACTORIES, "reverse", lambda encoder, manifest, variant: _ReverseReranker())
    session = DemoSession(tiny_export, tiny_index)
    assert session.has_reranker
    item = session.retriever.item_ids()[2]
    chosen = ActiveReference(kind="gallery", item_id=item)
    plain = session.search(reference=chosen, text="make it red", k=5)
    reranked = session.search(reference=chosen, text="make it red", k=5, rerank=True)
    assert reranked.latency_split()["re-rank"] is not None and plain.latency_split()["re-rank"] is None
    assert [h.item_id for h in reranked.hits] != [h.item_id for h in plain.hits]


@pytest.mark.browser
def test_the_page_in_chromium(demo, solved, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is part of the dev extra")
    query, reference = solved
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            drive_the_page(browser.new_page(viewport={"width": 1400, "height": 1000}), demo.url, demo.session.retriever,
                           example_text=demo.examples[0].text, query=query, reference=reference,
                           screenshot=ARTIFACTS / "demo.png")
            drive_refusals(browser.new_page(viewport={"width": 1400, "height": 1000}), demo.url, demo.session.retriever,
                           query=query, reference=reference, scratch=tmp_path)
        finally:
            browser.close()


# Geometry of the first result tiles: the image box, its caption, the tile and the block's floating label.
_TILE_GEOMETRY = """(selector) => {
  const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; };
  const label = document.querySelector(selector + ' [data-testid="block-label"]');
  return Array.from(document.querySelectorAll(selector + ' .thumbnail-item')).slice(0, 5).map(tile => {
    const img = tile.querySelector('img');
    return {tile: box(tile), img: box(img), caption: box(tile.querySelector('.caption-label')), label: label ? box(label) : null,
            fit: getComputedStyle(img).objectFit, natural: [img.naturalWidth, img.naturalHeight]};
  });
}"""
_TABLE_IN_ORDER = """(ids) => {
  const text = document.querySelector('#results-table').innerText; let last = -1;
  for (const id of ids) { const at = text.indexOf(id); if (at <= last) return false; last = at; }
  return true;
}"""


def _search_shows(page, ids: list[str]) -> None:
    page.locator("#search").click()
    page.wait_for_function(_TABLE_IN_ORDER, arg=ids, timeout=60_000)


def _reference_says(page, words: str) -> str:
    page.wait_for_function("(w) => document.querySelector('#reference').innerText.includes(w)", arg=words, timeout=30_000)
    return page.locator("#reference").inner_text()


def _check_thumbnails_whole(page, selector: str) -> None:
    loaded = ("(s) => { const i = Array.from(document.querySelectorAll(s + ' .thumbnail-item img')); "
              "return i.length > 0 && i.every(e => e.complete && e.naturalWidth > 0); }")
    page.wait_for_function(loaded, arg=selector, timeout=30_000)
    tiles = page.evaluate(_TILE_GEOMETRY, selector)
    for tile in tiles:
        img, caption, outer = tile["img"], tile["caption"], tile["tile"]
        assert tile["fit"] == "contain", tile  # whole: scaled into its box, never cropped
        assert outer["top"] - 1 <= img["top"] and img["bottom"] <= outer["bottom"] + 1, tile  # the box lies inside the tile
        width, height = img["right"] - img["left"], img["bottom"] - img["top"]
        assert abs(width / height - tile["natural"][0] / tile["natural"][1]) < 0.05, tile  # square scenes in square boxes
        assert caption["top"] >= img["bottom"] - 1, tile  # the caption is below the image, not over it
        if tile["label"] is not None:
            overlap = min(img["right"], tile["label"]["right"]) > max(img["left"], tile["label"]["left"])
            assert not overlap or tile["label"]["bottom"] <= img["top"] + 1, tile  # nor the block's label


def drive_the_page(page, url: str, retriever: Retriever, *, example_text: str, query: Query, reference: Path,
                   screenshot: Path | None = None) -> None:
    """The page as a person uses it; ``retriever`` is the one the page runs (what it must show)."""
    def expected(**reference_arg: object) -> list[str]:
        return [h.item_id for h in retriever.search(**reference_arg, text=query.text, k=K)]  # type: ignore[arg-type]

    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#search", timeout=60_000)
    assert example_text in page.content()  # one-click examples are on the page
    assert "none yet" in _reference_says(page, "Reference")

    upload = page.locator("#reference-upload input[type=file]")
    upload.set_input_files(files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
    page.wait_for_function("document.querySelector('#status').innerText.includes('not a readable image')", timeout=30_000)
    upload.set_input_files(str(reference))  # the refused file was cleared, so the input is back
    assert reference.name in _reference_says(page, "(upload)")
    page.locator("#modification textarea").fill(query.text)
    k_box = page.locator("#k input[type=number]")
    k_box.fill(str(K))
    k_box.press("Tab")
    by_upload = expected(reference_image=reference.read_bytes())
    _search_shows(page, by_upload)
    assert "(warm)" in page.locator("#latency").inner_text()
    _check_thumbnails_whole(page, "#results")
    _check_thumbnails_whole(page, "#gallery")

    # A gallery click replaces the upload as the reference: the stale upload must not win.
    ids = retriever.item_ids()
    picked = next(i for i in ids if expected(reference_id=i) != by_upload)
    page.locator("#reference-id textarea").fill(picked)  # typed, then Search at once: the typed id wins
    _search_shows(page, expected(reference_id=picked))
    assert picked in _reference_says(page, "(typed id)")
    page.locator("#gallery button.thumbnail-item").nth(1).click()
    line = _reference_says(page, "(gallery)")
    clicked = page.locator("#reference-id textarea").input_value()
    assert clicked in line and clicked != picked
    _search_shows(page, expected(reference_id=clicked))
    upload.set_input_files(str(reference))  # and an upload replaces the click
    _reference_says(page, "(upload)")
    assert page.locator("#reference-id textarea").input_value() == ""
    _search_shows(page, by_upload)

    # An example becomes the reference, runs, and says where its target ranks.
    page.get_by_text(example_text, exact=True).first.click()
    _reference_says(page, "(example)")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Target')", timeout=60_000)
    status = page.locator("#status").inner_text()
    assert "rank" in status or "not in the top" in status, status
    if "rank" in status:
        assert "★" in page.locator("#results-table").inner_text()
    if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=True)


# The displayed size of the first image under a selector: what object-fit makes of its natural size in its box.
_SHOWN_WIDTH = """(selector) => {
  const img = document.querySelector(selector); const box = img.getBoundingClientRect(); const style = getComputedStyle(img);
  const inner = [box.width - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight),
                 box.height - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom)];
  let scale = Math.min(inner[0] / img.naturalWidth, inner[1] / img.naturalHeight);
  if (style.objectFit === 'scale-down') scale = Math.min(scale, 1);
  if (style.objectFit === 'none') scale = 1;
  return img.naturalWidth * scale;
}"""
_NAME_WHOLE = """(selector) => {
  const stem = document.querySelector(selector + ' .filename .stem');
  return stem !== null && stem.scrollWidth <= stem.clientWidth + 1 && getComputedStyle(stem).textOverflow !== 'ellipsis';
}"""
_ADD_ROWS = "() => Array.from(document.querySelectorAll('#new-files tr.file')).map(r => r.querySelector('a').href)"


def drive_refusals(page, url: str, retriever: Retriever, *, query: Query, reference: Path, scratch: Path) -> None:
    """What a refusal leaves: the reference chosen before, the add list the user will add, and the page's wording."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#search", timeout=60_000)
    assert "grid cells row by row" in page.locator("#id-legend").inner_text()  # the synthetic gallery's ids explained

    # A refused upload leaves the gallery click active and shown; Search uses it, nothing unseen.
    page.locator("#gallery button.thumbnail-item").nth(2).click()
    _reference_says(page, "(gallery)")
    clicked = page.locator("#reference-id textarea").input_value()
    upload = page.locator("#reference-upload input[type=file]")
    upload.set_input_files(files=[{"name": "renamed.png", "mimeType": "image/png", "buffer": b"a text file"}])
    page.wait_for_function("document.querySelector('#status').innerText.includes('not a readable image')", timeout=30_000)
    assert clicked in _reference_says(page, "(gallery)") and "none yet" not in page.locator("#reference").inner_text()
    page.locator("#modification textarea").fill(query.text)
    _search_shows(page, [h.item_id for h in retriever.search(reference_id=clicked, text=query.text, k=K)])

    # An upload is named whole and previewed as large as a result.
    named = scratch / "some-long-reference-name.png"
    shutil.copy(reference, named)
    upload.set_input_files(str(named))
    assert named.name in _reference_says(page, "(upload)")
    page.wait_for_function(_NAME_WHOLE, arg="#reference-upload", timeout=30_000)
    _search_shows(page, [h.item_id for h in retriever.search(reference_image=named.read_bytes(), text=query.text, k=K)])
    page.wait_for_function("(n) => { const i = document.querySelector('#preview img'); "
                           "return i !== null && i.complete && i.naturalWidth > 0 && decodeURIComponent(i.src).includes(n); }",
                           arg=named.name, timeout=30_000)
    _check_thumbnails_whole(page, "#results")  # loaded
    assert page.evaluate(_SHOWN_WIDTH, "#preview img") >= 0.9 * page.evaluate(_SHOWN_WIDTH, "#results .thumbnail-item img")

    # Refused as existing, then picked again to replace it: the list holds the one file Add will add.
    again = scratch / "page-again.png"
    shutil.copy(reference, again)
    adder = page.locator("#new-files input[type=file]")
    adder.set_input_files(str(again))
    page.wait_for_function(f"({_ADD_ROWS})().length === 1", timeout=30_000)
    page.locator("#add").click()
    page.wait_for_function("document.querySelector('#add-status').innerText.includes('Added 1')", timeout=60_000)
    adder.set_input_files(str(again))
    page.wait_for_function(f"({_ADD_ROWS})().length === 1", timeout=30_000)
    page.locator("#add").click()
    page.wait_for_function("document.querySelector('#add-status').innerText.includes('already in the gallery: page-again')",
                           timeout=60_000)
    first = page.evaluate(_ADD_ROWS)
    page.locator("#replace input").check()
    Image.open(reference).convert("RGB").rotate(90).save(again)  # edited, picked again
    adder.set_input_files(str(again))
    page.wait_for_function(f"(old) => {{ const rows = ({_ADD_ROWS})(); return rows.length === 1 && rows[0] !== old[0]; }}",
                           arg=first, timeout=30_000)
    page.locator("#add").click()
    page.wait_for_function("document.querySelector('#add-status').innerText.includes('replaced 1 existing item(s): page-again')",
                           timeout=60_000)


def test_demo_imports_no_model_code_and_its_cli_has_help():
    code = (
        "import sys, compir.demo.app, compir.demo.launch\n"
        "bad = [m for m in ('torch', 'open_clip', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "from compir.cli import main\n"
        "main(['demo', '--help'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "compir demo exports/tiny indexes/tiny" in result.stdout and "--share" in result.stdout


_DEMO_MAIN = """
import sys
from compir.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print("gradio imported:", "gradio" in sys.modules)
sys.exit(code)
"""


def _run_demo_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _DEMO_MAIN, "demo", *args], capture_output=True, text=True, timeout=120, check=False)


def test_wrong_paths_and_a_busy_port_fail_fast_with_one_line(tiny_export, tiny_index, micro_export, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = {
            "no-export": ([str(tmp_path / "nowhere"), str(tiny_index)], "export folder"),
            "no-index": ([str(tiny_export), str(tmp_path / "nowhere")], "index folder"),
            "other-encoder": ([str(micro_export), str(tiny_index)], "built with another encoder"),
            "busy-port": ([str(tiny_export), str(tiny_index), "--port", port], f"port {port}"),
            "bad-port": ([str(tiny_export), str(tiny_index), "--port", "70000"], "not a TCP port"),
            "no-examples": ([str(tiny_export), str(tiny_index), "--examples", str(tmp_path / "missing")], "--examples"),
        }
        for case, (args, message) in cases.items():
            result = _run_demo_cli(*args)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, (case, result.stderr)
            assert len(lines) == 1 and lines[0].startswith("compir demo: error:") and message in lines[0], (case, result.stderr)
            assert "gradio imported: False" in result.stdout, case


def test_quickstart_demo_refuses_a_busy_port_before_any_work(tmp_path):
    from compir.quickstart import main as quickstart

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(InputError, match=f"port {busy.getsockname()[1]}"):
            quickstart(["--demo", "--port", str(busy.getsockname()[1]), "--out", str(tmp_path / "qs")])
    assert not (tmp_path / "qs").exists()
