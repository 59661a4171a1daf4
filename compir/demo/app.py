"""The Gradio page over a :class:`~compir.demo.session.DemoSession`. Every handler turns an
InputError into a message on the page (never a stack trace). API names (for gradio_client):
``/search``, ``/add_images``, ``/gallery_page``, ``/switch_backend``.

The reference is one state: whatever the user chose last (an upload, an example, a gallery click
or a typed id) becomes the active reference, shown in the "Reference:" line and its preview, and
is what Search uses. Choosing one clears the widgets of the others."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from compir.data.synth_scene import key_legend, parse_scene_key
from compir.demo.examples import DemoExample
from compir.demo.session import ActiveReference, DemoAnswer, DemoSession
from compir.errors import CompirError
from compir.runtime.types import ZERO_SHOT_CACHE_NOTE, AddResult

PER_PAGE = 24
TITLE = "compir: composed image retrieval"
INTRO = (
    "Pick a **reference** (upload one, click an example or an image in the gallery, or type a gallery id), "
    "describe the **change** (\"make it red\", \"add a blue circle\"), and get the gallery images that match. "
    "Everything runs on the torch-free runtime (ONNX + usearch)."
)
NO_REFERENCE = "**Reference:** none yet: upload an image, click an example or a gallery image, or type a gallery id."
TARGET_MARK = "★"  # in every font (headless browsers often have no emoji font)
# Thumbnails whole (no crop) with their captions below them, not over the scene. Gradio's gallery
# grid squares each tile and lays the caption over the image; the page's own CSS undoes both.
CSS = """
#results .grid-wrap, #gallery .grid-wrap { padding-top: 2.5rem; }  /* below the block's floating label */
#results .thumbnail-item, #gallery .thumbnail-item { aspect-ratio: auto; height: auto; overflow: visible; }
#results .thumbnail-lg, #gallery .thumbnail-lg { display: flex; flex-direction: column; align-items: stretch; }
#results .thumbnail-lg > img, #gallery .thumbnail-lg > img { object-fit: contain; aspect-ratio: 1 / 1; height: auto; }
#results .caption-label, #gallery .caption-label {
  position: static; max-width: 100%; border: none; border-radius: 0; background: none; text-align: center;
  white-space: normal; overflow-wrap: anywhere; opacity: 1 !important;
}/* File lists name the whole file: Gradio gives the size column 128 px and cuts the name to "s..png". */
#reference-upload td.download, #new-files td.download { min-width: 0; white-space: normal; }
#reference-upload .filename .stem, #new-files .filename .stem {
  overflow: visible; text-overflow: clip; white-space: normal; overflow-wrap: anywhere;
}
/* The reference preview fills its box below the label, as large as a result (Gradio: scale-down, 64 px). */
#preview img { object-fit: contain; width: 100%; height: 100%; padding-top: 2rem; box-sizing: border-box; }
"""


def build_demo(session: DemoSession, *, examples: Sequence[DemoExample] = ()) -> gr.Blocks:
    """The page; launch it with ``.launch(server_name="127.0.0.1", css=CSS, ...)``."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        page_ids = gr.State([])
        page = gr.State(0)
        reference = gr.State(None)  # ActiveReference | None: the one reference Search uses
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    reference_file = gr.File(label="Upload a reference image", type="filepath", elem_id="reference-upload")
                    preview = gr.Image(label="Reference", type="filepath", interactive=False, height=180, elem_id="preview")
                reference_line = gr.Markdown(NO_REFERENCE, elem_id="reference")
                reference_id = gr.Textbox(label="…or type a gallery item id (or click an image below)", elem_id="reference-id")
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
                results = gr.Gallery(label="Top-k results", columns=5, height="auto", object_fit="contain",
                                     allow_preview=False, elem_id="results")
                table = gr.Dataframe(headers=["rank", "item_id", "score", "target"], label="Results", elem_id="results-table")
                latency = gr.Markdown(elem_id="latency")
                legend = id_legend(session.retriever.item_ids()[:8])
                if legend:
                    gr.Markdown(legend, elem_id="id-legend")
        search_outputs = [results, table, latency, status]
        # What choosing a reference updates: the state, its line and preview, and the other widgets.
        reference_outputs = [reference, reference_line, preview, reference_file, reference_id]
        if examples:
            by_text = {e.text: e for e in examples}
            gr.Examples(
                [[_example_image(session, e), e.text, 5] for e in examples],
                inputs=[preview, text, k],
                outputs=[*search_outputs, *reference_outputs],
                fn=lambda image, t, n: _run_example(session, by_text.get(t), t, n),
                run_on_click=True,
                cache_examples=False,
                label="Examples from the synthetic benchmark (one click runs them; ★ marks the known target)",
            )
        with gr.Accordion("Gallery", open=True):
            gallery_info = gr.Markdown()
            with gr.Row():
                prev_button = gr.Button("◀ previous", size="sm")
                next_button = gr.Button("next ▶", size="sm")
            gallery = gr.Gallery(label="Gallery (click to use as the reference)", columns=8, height="auto",
                                 object_fit="contain", allow_preview=False, elem_id="gallery")
            with gr.Row():
                new_files = gr.File(label="Add images to the gallery", file_count="multiple", type="filepath", elem_id="new-files")
                with gr.Column():
                    replace = gr.Checkbox(label="replace items with the same id", value=False, elem_id="replace")
                    add_button = gr.Button("Add to gallery", elem_id="add")
            add_status = gr.Markdown(elem_id="add-status")

        def show_page(number: int) -> tuple[Any, ...]:
            shown, pages = session.gallery_page(number, per_page=PER_PAGE)
            number = min(max(number, 0), pages - 1)
            info = f"{len(session.retriever)} items · page {number + 1} of {pages}"
            return [(str(p), i) for i, p in shown], [i for i, _ in shown], number, info

        page_outputs = [gallery, page_ids, page, gallery_info]
        ui_search = _guard(lambda chosen, typed, *a: _search(session, _with_typed_id(chosen, typed), *a), search_outputs)
        ui_inputs = [reference, reference_id, text, k, rerank, text_only]
        search_button.click(ui_search, ui_inputs, search_outputs, api_visibility="private")
        text.submit(ui_search, ui_inputs, search_outputs, api_visibility="private")
        # The API names its reference explicitly: an uploaded image or a gallery item id, not both.
        api_trigger = gr.Button(visible=False)
        api_trigger.click(_guard(lambda f, i, *a: _search(session, session.reference_from(upload=f, item_id=i), *a), search_outputs),
                          [reference_file, reference_id, text, k, rerank, text_only], search_outputs, api_name="search")
        prev_button.click(lambda n: show_page(n - 1), page, page_outputs, api_visibility="private")
        next_button.click(lambda n: show_page(n + 1), page, page_outputs, api_visibility="private")
        demo.load(lambda: show_page(0), None, page_outputs, api_name="gallery_page")
        gallery.select(_pick(session), page_ids, reference_outputs, api_visibility="private")
        for typed_event in (reference_id.submit, reference_id.blur):  # not per keystroke: one event when typing ends
            typed_event(_typed(session), [reference, reference_id], [reference, reference_line, preview, reference_file],
                        api_visibility="private")
        reference_file.upload(_uploaded(session), [reference_file, reference], [*reference_outputs, status], api_visibility="private")
        reference_file.clear(_upload_cleared, reference, [reference, reference_line, preview], api_visibility="private")
        backend.change(_guard(lambda label: _switch(session, label), [status]), backend, [status], api_name="switch_backend")

        def add(paths: list[str] | None, replace_existing: bool, number: int) -> tuple[Any, ...]:
            report = session.add_images(paths or [], replace=bool(replace_existing))
            return (_add_text(report), None, *show_page(number))

        # Picking a file again (say after a refusal, to replace) replaces its entry: the list holds what Add adds.
        new_files.upload(latest_by_name, new_files, new_files, api_visibility="private")
        add_outputs = [add_status, new_files, *page_outputs]
        add_button.click(_guard(add, add_outputs, message_at=0), [new_files, replace, page], add_outputs, api_name="add_images")
    return demo


def _search(session: DemoSession, reference: ActiveReference | None, text: str, k: float, rerank: bool,
            text_only: bool) -> tuple[Any, ...]:
    answer = session.search(reference=reference, text=text, k=int(k), rerank=bool(rerank), text_only=bool(text_only))
    targets = set(answer.targets)
    tiles = []
    for rank, hit in enumerate(answer.hits, 1):
        path = session.image_path(hit.item_id)
        if path is not None:
            mark = f"{TARGET_MARK} " if hit.item_id in targets else ""
            tiles.append((str(path), f"{mark}{rank}. {hit.item_id} ({hit.score:.3f})"))
    rows = [[rank, hit.item_id, round(hit.score, 4), TARGET_MARK if hit.item_id in targets else ""]
            for rank, hit in enumerate(answer.hits, 1)]
    mode = "text-only" if text_only else "composed"
    summary = f"{len(answer.hits)} result{'' if len(answer.hits) == 1 else 's'} ({mode}, {session.backend.label})."
    return tiles, rows, _latency_text(answer), " ".join([summary, *_target_lines(answer)])


def _run_example(session: DemoSession, example: DemoExample | None, text: str, k: float) -> tuple[Any, ...]:
    """An example click: it becomes the active reference, then runs."""
    if example is None:  # the text was edited in the table: nothing to match
        return (*[gr.update() for _ in range(3)], "⚠️ unknown example", *[gr.update() for _ in range(5)])
    chosen = ActiveReference(kind="example", item_id=example.reference_id,
                             path=str(example.reference_path or "") if not example.reference_id else "",
                             targets=example.targets, example_text=example.text)
    try:
        found = _search(session, chosen, text, k, False, False)
    except CompirError as exc:
        found = (gr.update(), gr.update(), gr.update(), f"⚠️ {exc}")
    return (*found, *_show_reference(session, chosen), None, chosen.item_id)


def _target_lines(answer: DemoAnswer) -> list[str]:
    lines = []
    for target, rank in answer.target_ranks().items():
        where = f"rank {rank}" if rank is not None else f"not in the top {len(answer.hits)}"
        lines.append(f"{TARGET_MARK} Target `{target}`: {where}.")
    return lines


def _example_image(session: DemoSession, example: DemoExample) -> str | None:
    path = session.image_path(example.reference_id) if example.reference_id else example.reference_path
    return str(path) if path else None


def _latency_text(answer: DemoAnswer) -> str:
    parts = [f"{group} {'—' if ms is None else f'{ms:.1f} ms'}" for group, ms in answer.latency_split().items()]
    if "prompt_encode" in answer.timings_ms:  # zero-shot: the prompt holds the reference's token
        parts.append(f"text cache n/a (zero-shot: {ZERO_SHOT_CACHE_NOTE})")
    elif not {"tokenize", "text_encode"} & set(answer.timings_ms):  # the text's encoding came from the cache
        encode = answer.latency_split()["encode"]
        parts[0] = "text cached" if encode is None else f"encode {encode:.1f} ms (image; text cached)"
    total = sum(answer.timings_ms.values())
    state = "warm" if answer.warm else "cold: the first query since start, slower than the next"
    return f"**Latency** ({state}) {' · '.join(parts)} · **total {total:.1f} ms**"


def latest_by_name(paths: list[str] | None) -> list[str] | None:
    """One entry per file name, the latest pick's file, in the order names were first picked."""
    if not paths:
        return paths
    return list({Path(path).name: path for path in paths}.values())


def id_legend(ids: Sequence[str]) -> str:
    """How to read the gallery's ids when they are the synthetic benchmark's scene keys, else ""."""
    try:
        for item_id in ids:
            parse_scene_key(item_id)
    except ValueError:
        return ""
    return key_legend() if ids else ""


def _add_text(report: AddResult) -> str:
    parts = []
    if report.added:
        parts.append(f"Added {len(report.added)} image(s): {', '.join(report.added)}")
    if report.replaced:
        parts.append(f"replaced {len(report.replaced)} existing item(s): {', '.join(report.replaced)}")
    return f"{'; '.join(parts)}; the index is saved."


def _switch(session: DemoSession, label: str) -> str:
    choice = session.switch_backend(label)
    return f"Backend: {choice.label} ({session.retriever.backend_info.get('providers', '')})."


def _show_reference(session: DemoSession, chosen: ActiveReference | None) -> tuple[Any, ...]:
    """(state, "Reference:" line, preview) for the active reference."""
    if chosen is None:
        return None, NO_REFERENCE, None
    path = chosen.path or (str(session.image_path(chosen.item_id) or "") if chosen.item_id else "")
    known = bool(chosen.path) or session.contains(chosen.item_id)
    line = f"**Reference:** {chosen.describe()}" + ("" if known else " ⚠️ no such gallery item")
    return chosen, line, path or None


def _pick(session: DemoSession) -> Callable[..., tuple[Any, ...]]:
    def pick(ids: list[str], event: gr.SelectData) -> tuple[Any, ...]:
        item_id = ids[event.index] if isinstance(event.index, int) and event.index < len(ids) else ""
        chosen = ActiveReference(kind="gallery", item_id=item_id) if item_id else None
        return (*_show_reference(session, chosen), None, item_id)

    return pick


def _with_typed_id(chosen: ActiveReference | None, typed: str | None) -> ActiveReference | None:
    """The active reference, given the id box. Every other choice writes its own id into the box
    (or empties it), so a box that differs from the state was typed in after it: the typed id wins.
    Search applies this itself, so it never races the box's own event."""
    typed = (typed or "").strip()
    if chosen is not None and chosen.item_id == typed:
        return chosen
    if not typed:  # an id reference whose id was erased is gone; an image one never had an id in the box
        return None if chosen is not None and chosen.item_id else chosen
    return ActiveReference(kind="typed id", item_id=typed)


def _typed(session: DemoSession) -> Callable[..., tuple[Any, ...]]:
    def typed(current: ActiveReference | None, item_id: str) -> tuple[Any, ...]:
        chosen = _with_typed_id(current, item_id)
        if chosen is current:
            return gr.update(), gr.update(), gr.update(), gr.update()
        return (*_show_reference(session, chosen), None)

    return typed


def _uploaded(session: DemoSession) -> Callable[..., tuple[Any, ...]]:
    def uploaded(path: str | None, current: ActiveReference | None) -> tuple[Any, ...]:
        """A usable upload becomes the reference; a bad one is refused and cleared, and the reference
        chosen before it stays active and shown (its id stays in the box), so Search uses nothing unseen."""
        if not path:
            return (*_show_reference(session, None), None, gr.update(), "")
        try:
            session.check_upload(path, what="reference image")
        except CompirError as exc:
            still = f" The reference is still {current.describe()}." if current is not None else ""
            return (*_show_reference(session, current), None, current.item_id if current is not None else "", f"⚠️ {exc}{still}")
        chosen = ActiveReference(kind="upload", path=path)
        return (*_show_reference(session, chosen), gr.update(), "", "")

    return uploaded


def _upload_cleared(current: ActiveReference | None) -> tuple[Any, ...]:
    """The user removed the upload: it stops being the reference (another choice stays)."""
    if current is not None and current.kind == "upload":
        return None, NO_REFERENCE, None
    return gr.update(), gr.update(), gr.update()


def _guard(fn: Callable[..., Any], outputs: list[Any], *, message_at: int = -1) -> Callable[..., Any]:
    """Run ``fn``; on a CompirError leave the other outputs as they are and show the message in
    ``outputs[message_at]`` (the status line of that part of the page)."""

    def guarded(*args: Any) -> Any:
        try:
            return fn(*args)
        except CompirError as exc:
            message = f"⚠️ {exc}"
            if len(outputs) == 1:
                return message
            updates: list[Any] = [gr.update() for _ in outputs]
            updates[message_at] = message
            return tuple(updates)

    return guarded


def image_folders(session: DemoSession, examples: Sequence[DemoExample]) -> list[str]:
    """Folders Gradio may serve images from: the gallery's and the examples'."""
    folders = {str(p) for p in session.image_folders()}
    folders |= {str(Path(e.reference_path).resolve().parent) for e in examples if e.reference_path}
    return sorted(folders)
