"""What the demo does, without any UI: one Retriever (reloaded when the backend changes, and
warmed up so the page reports warm latencies), searches from the one active reference with a
latency split and the example's target rank, gallery pages and gallery additions. Torch-free
and Gradio-free, so it is tested directly and the Gradio layer stays a thin shell."""

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
from compir.runtime.types import AddResult, Hit
from compir.runtime.uploads import upload_item_id

# The runtime's stages grouped the way the page reports them.
LATENCY_GROUPS = {
    "encode": ("decode", "preprocess", "image_encode", "tokenize", "text_encode"),
    "compose": ("compose", "token_map", "prompt_encode"),  # the last two: a zero-shot export's
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
class ActiveReference:
    """The one reference a search uses: whatever the user chose last (an upload, an example, a
    gallery click or a typed id). Exactly one of ``item_id`` (a gallery item) and ``path`` (an
    image file) is set; an example also knows its target(s), which hold for its own text only."""

    kind: str  # "upload" | "example" | "gallery" | "typed id"
    item_id: str = ""
    path: str = ""
    targets: tuple[str, ...] = ()
    example_text: str = ""

    def __post_init__(self) -> None:
        if bool(self.item_id) == bool(self.path):
            raise ValueError("an ActiveReference names a gallery item or an image file, not both or neither")

    def describe(self) -> str:
        what = f"gallery item `{self.item_id}`" if self.item_id else f"image `{Path(self.path).name}`"
        return f"{what} ({self.kind})"

    def targets_for(self, text: str) -> tuple[str, ...]:
        """The example's targets if ``text`` is still the example's own text, else ()."""
        return self.targets if self.targets and text.strip() == self.example_text.strip() else ()


@dataclass(frozen=True)
class DemoAnswer:
    hits: tuple[Hit, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)
    warm: bool = True  # False: the first query on a retriever whose warm-up failed (figures include start-up)
    targets: tuple[str, ...] = ()  # the example's known answers, when the query is an example's

    def target_ranks(self) -> dict[str, int | None]:
        """1-based rank of each target among the hits, None where it is not in them."""
        ranks = {hit.item_id: rank for rank, hit in enumerate(self.hits, 1)}
        return {target: ranks.get(target) for target in self.targets}

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
        prompt_template: str | None = None,
    ) -> None:
        self.export_dir = Path(export_dir)
        self.prompt_template = prompt_template  # a zero-shot export's query-time template (None: the export's)
        self.index_dir = Path(index_dir)
        self.backends = available_backends(export_dir)
        self.backend = backend or self.backends[-1]  # CPU: always present, never surprising
        self.max_upload_bytes = max_upload_bytes
        self.max_image_pixels = max_image_pixels
        self._lock = threading.RLock()
        self.warm = False
        self.retriever = self._open(self.backend)

    def _open(self, choice: BackendChoice) -> Retriever:
        retriever = Retriever.from_dirs(self.export_dir, self.index_dir, backend=choice.backend, providers=choice.providers,
                                        writable=True,  # the demo saves additions: one writer per index
                                        prompt_template=self.prompt_template)
        self.warm = retriever.warmed_up is not None  # from_dirs warmed every stage: the page reports warm latencies
        return retriever

    def switch_backend(self, label: str) -> BackendChoice:
        """Reopen the export on another backend; the index is re-read, so saved additions stay."""
        choice = next((c for c in self.backends if c.label == label), None)
        if choice is None:
            raise InputError(f"unknown backend {label!r}; choose one of {[c.label for c in self.backends]}")
        with self._lock:
            if choice != self.backend:
                self.retriever.close()  # its writer lock passes to the reopened index
                self.retriever = self._open(choice)
                self.backend = choice
        return choice

    @property
    def has_reranker(self) -> bool:
        return self.retriever.has_reranker

    def search(
        self,
        *,
        reference: ActiveReference | None,
        text: str,
        k: int,
        rerank: bool = False,
        text_only: bool = False,
    ) -> DemoAnswer:
        """A composed query (the active reference + text), or text-only."""
        image: bytes | None = None
        item_id: str | None = None
        if not text_only:
            if reference is None:
                raise InputError("choose a reference image (upload one, click an example or a gallery image, "
                                 "or type a gallery id), or tick text-only")
            if reference.path:
                image = self.check_upload(reference.path, what="reference image")
            elif not self.contains(reference.item_id):
                raise InputError(f"gallery item {reference.item_id!r} does not exist; pick one in the gallery")
            else:
                item_id = reference.item_id
        with self._lock:
            retriever, warm = self.retriever, self.warm
        result = retriever.search_detailed(reference_image=image, reference_id=item_id, text=text, k=int(k), rerank=rerank)
        self.warm = True
        targets = reference.targets_for(text) if reference is not None and not text_only else ()
        return DemoAnswer(hits=result.hits, timings_ms=dict(result.timings_ms), warm=warm, targets=targets)

    def reference_from(self, *, upload: str | None, item_id: str | None) -> ActiveReference | None:
        """The reference the API's explicit arguments name (at most one of them)."""
        item_id = (item_id or "").strip() or None
        if upload and item_id:
            raise InputError("give a reference image or a gallery item id, not both")
        if upload:
            return ActiveReference(kind="upload", path=upload)
        return ActiveReference(kind="typed id", item_id=item_id) if item_id else None

    def check_upload(self, path: str, *, what: str) -> bytes:
        """The file's bytes if it is a usable image, else InputError naming the problem."""
        name = f"{what} {Path(path).name!r}"
        load_image(path, name=name, max_bytes=self.max_upload_bytes, max_pixels=self.max_image_pixels)
        return Path(path).read_bytes()

    def contains(self, item_id: str) -> bool:
        return bool(self.retriever.present([item_id]))

    def add_images(self, paths: Sequence[str], *, replace: bool = False) -> AddResult:
        """Add uploaded files and save the index atomically. Their ids follow the service's rule
        (:func:`~compir.runtime.uploads.upload_item_id`: the file name without extension).

        Every file is checked first, so one bad file adds nothing. An id already in the gallery is
        an InputError naming it unless ``replace`` (then the report lists what was replaced)."""
        if not paths:
            raise InputError("choose one or more image files to add")
        items: dict[str, bytes] = {}
        for path in paths:
            item_id = upload_item_id(Path(path).name)
            if item_id in items:
                raise InputError(f"two files would both become item {item_id!r}; rename one; nothing was added")
            items[item_id] = self.check_upload(path, what="image")
        with self._lock:
            if not replace:  # the retriever refuses them too; this says it in the page's words
                held = self.retriever.present(list(items))
                existing = [item_id for item_id in items if item_id in held]
                if existing:
                    raise InputError(f"already in the gallery: {', '.join(existing)}; tick 'replace' to replace "
                                     "them, or rename the file(s); nothing was added")
            done = self.retriever.add_items(items, replace=replace)
            self.retriever.save()
        return done

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

