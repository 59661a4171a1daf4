"""Start the demo: build the session, the examples and the page, and launch it on 127.0.0.1."""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from compir.demo.app import CSS, build_demo, image_folders
from compir.demo.cli import HOST
from compir.demo.examples import DemoExample, find_examples
from compir.demo.session import DEFAULT_MAX_UPLOAD_BYTES, DemoSession


@dataclass
class RunningDemo:
    blocks: gr.Blocks
    session: DemoSession
    examples: list[DemoExample]
    url: str

    def close(self) -> None:
        self.blocks.close()


def launch_demo(
    export_dir: str | os.PathLike[str],
    index_dir: str | os.PathLike[str],
    *,
    port: int = 7860,
    examples_dir: str | os.PathLike[str] | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    block: bool = False,
    prompt_template: str | None = None,
) -> RunningDemo:
    """Launch on ``http://127.0.0.1:port``; ``block=False`` returns at once (tests, notebooks).
    ``prompt_template``: a zero-shot export's template for the page's queries (default: the export's)."""
    session = DemoSession(export_dir, index_dir, max_upload_bytes=max_upload_bytes, prompt_template=prompt_template)
    examples = find_examples(session, data_dir=examples_dir)
    blocks = build_demo(session, examples=examples)
    print(
        f"compir demo: {len(session.retriever)} gallery items, backend {session.backend.label}, "
        f"{len(examples)} example queries, re-ranker: {'yes' if session.has_reranker else 'no'}",
        flush=True,
    )
    _, url, _ = blocks.launch(
        server_name=HOST,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        allowed_paths=image_folders(session, examples),
        max_file_size=max_upload_bytes,
        ssr_mode=False,
        quiet=True,  # Gradio's banner suggests share=True, which this demo deliberately does not offer
        footer_links=["api"],
        css=CSS,
    )
    running = RunningDemo(blocks=blocks, session=session, examples=examples, url=url.rstrip("/"))
    print(f"compir demo: {running.url}  (Ctrl+C stops it)" if block else f"compir demo: {running.url}", flush=True)
    if block:
        blocks.block_thread()
    return running
