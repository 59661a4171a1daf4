"""The Gradio page over a :class:`~compir.demo.session.DemoSession`. Every handler turns an
InputError into a message on the page (never a stack trace). API names (for gradio_client):
``/search``, ``/add_images``, ``/gallery_page``, ``/switch_backend``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from compir.demo.examples import DemoExample
from compir.demo.session import DemoAnswer, DemoSession
from compir.errors import CompirError

PER_PAGE = 24
TITLE = "compir: composed image retrieval"
INTRO = (
    "Pick a **reference** (upload one, or click an image in the gallery), describe the **change** "
    "(\"make it red\", \"add a blue circle\"), and get the gallery images that match. "
    "Everything runs on the torch-free runtime (ONNX + usearch)."
)


def build_demo(session: DemoSession, *, examples: Sequence[DemoExample] = ()) -> gr.Blocks:
    """The page; launch it with ``.launch(server_name="127.0.0.1", ...)``."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        page_ids = gr.State([])
        page = gr.State(0)
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    reference_file = gr.File(label="Upload a reference image", type="filepath", elem_id="reference-upload")
                    preview = gr.Image(label="Reference", type="filepath", interactive=False, height=180)
                reference_id = gr.Textbox(label="…or a gallery item id (click an image below)", elem_id="reference-id")
                text = gr.Textbox(label="Modification text", placeholder="make it red", elem_id="modification")
                with gr.Row():
                    k = gr.Slider(1, 50, value=5, step=1, label="k (results)", elem_id="k")
                    text_only = gr.Checkbox(label="text-only (ignore the reference)", value=False)
                    rerank = gr.Checkbox(
                        label="re-rank" if session.has_reranker else "re-rank (this export has none)",
                        value=False,
                        interactive=session.has_reranker,
                    )
                backend = gr.Dropdown(
                    [c.label for c in session.backends], value=session.backend.label, label="Backend", elem_id="backend"
                )
                search_button = gr.Button("Search", variant="primary", elem_id="search")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=3):
                results = gr.Gallery(label="Top-k results", columns=5, height=220, object_fit="contain",
                                     elem_id="results")
                table = gr.Dataframe(headers=["rank", "item_id", "score"], label="Results", elem_id="results-table")
                latency = gr.Markdown(elem_id="latency")
        search_inputs = [reference_file, reference_id, text, k, rerank, text_only]
        search_outputs = [results, table, latency, status]
        if examples:
            # The reference column shows a thumbnail; a gallery id is used as is (cached features).
            gr.Examples(
                [[_example_image(session, e), e.reference_id, e.text, 5] for e in examples],
                inputs=[preview, reference_id, text, k],
                outputs=search_outputs,
                fn=lambda image, i, t, n: _search(session, None if i else image, i, t, n, False, False),
                run_on_click=True,
                cache_examples=False,
                label="Examples from the synthetic benchmark (one click runs them)",
            )
        with gr.Accordion("Gallery", open=True):
            gallery_info = gr.Markdown()
            with gr.Row():
                prev_button = gr.Button("◀ previous", size="sm")
                next_button = gr.Button("next ▶", size="sm")
            gallery = gr.Gallery(label="Gallery (click to use as the reference)", columns=8, height=260,
                                 object_fit="contain", allow_preview=False, elem_id="gallery")
            with gr.Row():
                new_files = gr.File(label="Add images to the gallery", file_count="multiple", type="filepath")
                add_button = gr.Button("Add to gallery", elem_id="add")
            add_status = gr.Markdown(elem_id="add-status")

        def show_page(number: int) -> tuple[Any, ...]:
            shown, pages = session.gallery_page(number, per_page=PER_PAGE)
            number = min(max(number, 0), pages - 1)
            info = f"{len(session.retriever)} items · page {number + 1} of {pages}"
            return [(str(p), i) for i, p in shown], [i for i, _ in shown], number, info

        page_outputs = [gallery, page_ids, page, gallery_info]
        search_button.click(_guard(lambda *a: _search(session, *a), search_outputs), search_inputs, search_outputs,
                            api_name="search")
        text.submit(_guard(lambda *a: _search(session, *a), search_outputs), search_inputs, search_outputs)
        prev_button.click(lambda n: show_page(n - 1), page, page_outputs, api_visibility="private")
        next_button.click(lambda n: show_page(n + 1), page, page_outputs, api_visibility="private")
        demo.load(lambda: show_page(0), None, page_outputs, api_name="gallery_page")
        gallery.select(_pick(session), page_ids, [reference_id, preview, reference_file], api_visibility="private")
        reference_file.upload(_preview_upload(session), reference_file, [preview, reference_id, status, reference_file],
                              api_visibility="private")
        backend.change(_guard(lambda label: _switch(session, label), [status]), backend, [status], api_name="switch_backend")

        def add(paths: list[str] | None, number: int) -> tuple[Any, ...]:
            added = session.add_images(paths or [])
            return (f"Added {len(added)} image(s): {', '.join(added)}; the index is saved.", None, *show_page(number))

        add_outputs = [add_status, new_files, *page_outputs]
        add_button.click(_guard(add, add_outputs), [new_files, page], add_outputs, api_name="add_images")
    return demo


def _search(session: DemoSession, reference_file: str | None, reference_id: str | None, text: str, k: float,
            rerank: bool, text_only: bool) -> tuple[Any, ...]:
    answer = session.search(reference_file=reference_file, reference_id=(reference_id or "").strip() or None,
                            text=text, k=int(k), rerank=bool(rerank), text_only=bool(text_only))
    tiles = []
    for rank, hit in enumerate(answer.hits, 1):
        path = session.image_path(hit.item_id)
        if path is not None:
            tiles.append((str(path), f"{rank}. {hit.item_id} ({hit.score:.3f})"))
    rows = [[rank, hit.item_id, round(hit.score, 4)] for rank, hit in enumerate(answer.hits, 1)]
    mode = "text-only" if text_only else "composed"
    return tiles, rows, _latency_text(answer), f"{len(answer.hits)} results ({mode}, {session.backend.label})."


def _example_image(session: DemoSession, example: DemoExample) -> str | None:
    path = session.image_path(example.reference_id) if example.reference_id else example.reference_path
    return str(path) if path else None


def _latency_text(answer: DemoAnswer) -> str:
    parts = [f"{group} {'—' if ms is None else f'{ms:.1f} ms'}" for group, ms in answer.latency_split().items()]
    total = sum(answer.timings_ms.values())
    return f"**Latency** {' · '.join(parts)} · **total {total:.1f} ms**"


def _switch(session: DemoSession, label: str) -> str:
    choice = session.switch_backend(label)
    return f"Backend: {choice.label} ({session.retriever.backend_info.get('providers', '')})."


def _pick(session: DemoSession) -> Callable[..., tuple[Any, ...]]:
    def pick(ids: list[str], event: gr.SelectData) -> tuple[Any, ...]:
        item_id = ids[event.index] if isinstance(event.index, int) and event.index < len(ids) else ""
        path = session.image_path(item_id) if item_id else None
        return item_id, (str(path) if path else None), None

    return pick


def _preview_upload(session: DemoSession) -> Callable[[str | None], tuple[Any, ...]]:
    def preview(path: str | None) -> tuple[Any, ...]:
        """(reference preview, reference id, status, upload): a bad file is refused and cleared."""
        if not path:
            return None, gr.update(), "", gr.update()
        try:
            session.check_upload(path, what="reference image")
        except CompirError as exc:
            return None, "", f"⚠️ {exc}", None
        return path, "", "", gr.update()

    return preview


def _guard(fn: Callable[..., Any], outputs: list[Any]) -> Callable[..., Any]:
    """Run ``fn``; on a CompirError leave other outputs as they are and show the message in the
    last output (the status line)."""

    def guarded(*args: Any) -> Any:
        try:
            return fn(*args)
        except CompirError as exc:
            message = f"⚠️ {exc}"
            if len(outputs) == 1:
                return message
            return (*[gr.update() for _ in outputs[:-1]], message)

    return guarded


def image_folders(session: DemoSession, examples: Sequence[DemoExample]) -> list[str]:
    """Folders Gradio may serve images from: the gallery's and the examples'."""
    folders = {str(p) for p in session.image_folders()}
    folders |= {str(Path(e.reference_path).resolve().parent) for e in examples if e.reference_path}
    return sorted(folders)
