"""What the demo does, without any UI: one Retriever (reloaded when the backend changes),
searches with a latency split, gallery pages and gallery additions. Torch-free and Gradio-free,
so it is tested directly and the Gradio layer stays a thin shell."""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from compir.contracts import ENGINES_FILE
from compir.errors import InputError
from compir.images import DEFAULT_MAX_PIXELS, load_image
from compir.runtime.retriever import Retriever
from compir.runtime.types import Hit

# The runtime's stages grouped the way the page reports them.
LATENCY_GROUPS = {
    "encode": ("decode", "preprocess", "image_encode", "tokenize", "text_encode"),
    "compose": ("compose",),
    "search": ("search",),
    "re-rank": ("rerank",),
}
DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class BackendChoice:
    """One entry of the backend menu: a runtime backend and, for onnxruntime, its provider."""

    label: str
    backend: str
    providers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DemoAnswer:
    hits: tuple[Hit, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def latency_split(self) -> dict[str, float | None]:
        """Milliseconds per group (encode, compose, search, re-rank); None where it did not run."""
        split: dict[str, float | None] = {}
        for group, stages in LATENCY_GROUPS.items():
            spent = [self.timings_ms[s] for s in stages if s in self.timings_ms]
            split[group] = round(sum(spent), 3) if spent else None
        return split


def available_backends(export_dir: str | os.PathLike[str]) -> list[BackendChoice]:
    """The backends this machine can run for this export (onnxruntime providers first)."""
    import onnxruntime

    choices = [
        BackendChoice(f"onnxruntime · {name.removesuffix('ExecutionProvider')}", "onnxruntime", (name,))
        for name in onnxruntime.get_available_providers()
        if name in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    ]
    if (Path(export_dir) / ENGINES_FILE).is_file() and importlib.util.find_spec("tensorrt") is not None:
        choices.insert(0, BackendChoice("tensorrt · engines", "tensorrt"))
    return choices


class DemoSession:
    """The demo's state, shared by every browser tab (a demo, not a multi-tenant service)."""

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        index_dir: str | os.PathLike[str],
        *,
        backend: BackendChoice | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.export_dir = Path(export_dir)
        self.index_dir = Path(index_dir)
        self.backends = available_backends(export_dir)
        self.backend = backend or self.backends[-1]  # CPU: always present, never surprising
        self.max_upload_bytes = max_upload_bytes
        self.max_image_pixels = max_image_pixels
        self._lock = threading.RLock()
        self.retriever = self._open(self.backend)

    def _open(self, choice: BackendChoice) -> Retriever:
        return Retriever.from_dirs(self.export_dir, self.index_dir, backend=choice.backend, providers=choice.providers)

    def switch_backend(self, label: str) -> BackendChoice:
        """Reopen the export on another backend; the index is re-read, so saved additions stay."""
        choice = next((c for c in self.backends if c.label == label), None)
        if choice is None:
            raise InputError(f"unknown backend {label!r}; choose one of {[c.label for c in self.backends]}")
        with self._lock:
            if choice != self.backend:
                self.retriever = self._open(choice)
                self.backend = choice
        return choice

    @property
    def has_reranker(self) -> bool:
        return self.retriever.has_reranker

    def search(
        self,
        *,
        reference_file: str | None,
        reference_id: str | None,
        text: str,
        k: int,
        rerank: bool = False,
        text_only: bool = False,
    ) -> DemoAnswer:
        """A composed query (reference upload or gallery id + text), or text-only."""
        reference_image: bytes | None = None
        gallery_id: str | None = None
        if not text_only:
            if reference_file:
                reference_image = self.check_upload(reference_file, what="reference image")
            elif reference_id:
                if not self.contains(reference_id):
                    raise InputError(f"gallery item {reference_id!r} does not exist; pick one in the gallery")
                gallery_id = reference_id
            else:
                raise InputError("choose a reference image (upload one or click a gallery image), or tick text-only")
        with self._lock:
            retriever = self.retriever
        result = retriever.search_detailed(reference_image=reference_image, reference_id=gallery_id, text=text,
                                           k=int(k), rerank=rerank)
        return DemoAnswer(hits=result.hits, timings_ms=dict(result.timings_ms))

    def check_upload(self, path: str, *, what: str) -> bytes:
        """The file's bytes if it is a usable image, else InputError naming the problem."""
        name = f"{what} {Path(path).name!r}"
        load_image(path, name=name, max_bytes=self.max_upload_bytes, max_pixels=self.max_image_pixels)
        return Path(path).read_bytes()

    def contains(self, item_id: str) -> bool:
        try:
            self.retriever.item_image_path(item_id)
        except InputError:
            return False
        return True

    def add_images(self, paths: Sequence[str]) -> list[str]:
        """Add uploaded files (id = file name without extension) and save the index atomically.

        Every file is checked first, so one bad file adds nothing."""
        items = {Path(p).stem: self.check_upload(p, what="image") for p in paths}
        if not items:
            raise InputError("choose one or more image files to add")
        with self._lock:
            added = self.retriever.add_items(items)
            self.retriever.save()
        return added

    def gallery_page(self, page: int, *, per_page: int) -> tuple[list[tuple[str, Path]], int]:
        """((item id, image path) on page ``page`` (0-based, clamped), number of pages)."""
        ids = self.retriever.item_ids()
        pages = max(1, -(-len(ids) // per_page))
        page = min(max(page, 0), pages - 1)
        shown = []
        for item_id in ids[page * per_page : (page + 1) * per_page]:
            path = self.image_path(item_id)
            if path is not None:
                shown.append((item_id, path))
        return shown, pages

    def image_path(self, item_id: str) -> Path | None:
        try:
            path = self.retriever.item_image_path(item_id)
        except InputError:
            return None
        return path if path is not None and path.is_file() else None

    def image_folders(self) -> list[Path]:
        """Folders holding gallery images (Gradio serves files only from folders it was told)."""
        folders = {self.index_dir.resolve()}
        for item_id in self.retriever.item_ids():
            path = self.image_path(item_id)
            if path is not None:
                folders.add(path.resolve().parent)
        return sorted(folders)
