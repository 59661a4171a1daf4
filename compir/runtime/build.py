"""Build a gallery index from a folder of images: parallel decoding (thread pool), batched
encoding, a tqdm bar; images that fail to decode are reported by name, skipped and counted.

An item's id is its file's path below the folder without the suffix (``a/b.png`` -> ``a/b``), and
it must follow the id grammar of :mod:`compir.runtime.uploads`. A file whose id would not is
skipped with a reason, not renamed: a reversible escape (``%FF``, ``%E2%80%AE``) would give ids
that are no longer the file's name, collide with names that hold ``%``, and still show invisible
differences once decoded; so the id a user reads is always the file's own name, and renaming the
file is the fix. Files that would share one id (``dup.png`` and ``dup.jpg``) are all skipped,
together in one reason: which one is meant is not for the build to guess.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from compir.contracts import INDEX_FILE, atomic_output_dir, sha256_bytes
from compir.errors import InputError
from compir.images import load_image
from compir.manifest import EncoderFingerprint, PreprocessSpec
from compir.runtime.encoder import Encoder
from compir.runtime.gallery import IMAGES_DIR, Gallery
from compir.runtime.index import DEFAULT_DTYPE, HnswConfig
from compir.runtime.preprocess import preprocess_image
from compir.runtime.uploads import validate_item_id
from compir.runtime.writer_lock import WriterLock

if TYPE_CHECKING:
    from compir.runtime.milvus_store import MilvusConfig, MilvusStore

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class BuildReport:
    out_dir: Path
    count: int
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (file, reason)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted; hidden files are ignored."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def item_id_for(path: Path, root: Path) -> str:
    """``root/a/b.png`` -> ``a/b``: dataset image names are file names without suffix."""
    return path.relative_to(root).with_suffix("").as_posix()


@dataclass(frozen=True)
class GalleryFiles:
    """The image files of a folder that become items, their ids, and the files skipped (file, reason)."""

    files: list[Path]
    ids: list[str]
    skipped: list[tuple[str, str]]


def gallery_files(folder: str | Path) -> GalleryFiles:
    """The images under ``folder`` and their item ids (module docstring): a file whose id breaks
    the grammar, and every file of a group that would share one id, is skipped with a reason that
    names it (as ``repr``, so odd characters show and the reason stays one line)."""
    root = Path(folder).resolve()
    by_id: dict[str, list[Path]] = defaultdict(list)
    skipped: list[tuple[str, str]] = []
    for path in list_images(root):
        item_id = item_id_for(path, root)
        try:
            by_id[validate_item_id(item_id)].append(path)
        except InputError as exc:
            skipped.append((str(path), f"{_shown(path, root)}: {exc}"))
    files, ids = [], []
    for item_id, paths in by_id.items():  # in file order: a group comes where its first file does
        if len(paths) == 1:
            files.append(paths[0])
            ids.append(item_id)
        else:
            names = ", ".join(_shown(path, root) for path in paths)
            skipped.append((str(paths[0]), f"{names}: all would be item id {item_id!r}; rename all but one"))
    return GalleryFiles(files=files, ids=ids, skipped=skipped)


def _shown(path: Path, root: Path) -> str:
    """``repr`` of the path below ``root``; of its bytes when it is not UTF-8 (``b'bad\\xff.png'``)."""
    relative = path.relative_to(root).as_posix()
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes: show the bytes the file system holds
        return repr(os.fsencode(relative))
    return repr(relative)


def build_index(
    encoder: Encoder,
    *,
    images: str | Path,
    out: str | Path,
    dtype: str = DEFAULT_DTYPE,
    batch_size: int = 64,
    workers: int = 4,
    copy_images: bool = False,
    overwrite: bool = False,
    hnsw: HnswConfig = HnswConfig(),
    milvus: MilvusConfig | None = None,
    overwrite_collection: str | None = None,
    progress: bool = True,
) -> BuildReport:
    """Encode every image under ``images`` into a new index folder ``out`` (written atomically).

    Item ids are relative paths without suffix. Image paths are recorded absolute, or copied into
    ``out/images`` with ``copy_images`` (a self-contained, movable index). With ``milvus`` the
    items go into that Milvus collection (created; an existing one is replaced only with
    ``overwrite``, see :func:`write_index`) and ``out`` holds index.json naming it (``dtype`` and
    ``hnsw`` are usearch's).
    """
    found = gallery_files(images)
    start = time.perf_counter()
    batches = (
        EncodedBatch(batch_ids, batch_paths, *_encoded(encoder, pixels), errors)
        for batch_ids, batch_paths, pixels, errors in _decoded_batches(encoder, found.files, found.ids, batch_size, workers)
    )
    target = IndexTarget(encoder=encoder.fingerprint, ndim=encoder.embed_dim, feature_shape=encoder.feature_shape, dtype=dtype, hnsw=hnsw,
                         milvus=milvus)
    return write_index(batches, target=target, out=out, total=len(found.files), copy_images=copy_images, overwrite=overwrite,
                       overwrite_collection=overwrite_collection, progress=progress, start=start, skipped=found.skipped)


@dataclass(frozen=True)
class IndexTarget:
    """What the new gallery is bound to and how it stores vectors."""

    encoder: EncoderFingerprint
    ndim: int
    feature_shape: tuple[int, ...]
    dtype: str = DEFAULT_DTYPE
    hnsw: HnswConfig = HnswConfig()
    milvus: MilvusConfig | None = None  # the items go into this Milvus collection (dtype and hnsw are usearch's)


@dataclass(frozen=True)
class EncodedBatch:
    """Encoded items in file order, and the files before or among them that failed to decode."""

    ids: list[str]
    paths: list[Path]
    image_embeds: np.ndarray  # (B, D)
    image_features: np.ndarray  # (B, *F)
    errors: list[tuple[str, str]]  # (file, reason)
    inserted: int = 0  # items the workers already put into the store (Ray Data into a Milvus server): counted, not added


def write_index(
    batches: Iterable[EncodedBatch],
    *,
    target: IndexTarget,
    out: str | Path,
    total: int,
    copy_images: bool = False,
    overwrite: bool = False,
    overwrite_collection: str | None = None,
    progress: bool = True,
    start: float | None = None,
    skipped: Sequence[tuple[str, str]] = (),
) -> BuildReport:
    """Add encoded batches to a new gallery and save it into ``out`` (atomically): the one way an
    index folder is filled, whether the vectors come from this process or from Ray shards. A
    failed build leaves neither a folder nor a Milvus collection behind. ``overwrite`` replaces
    ``out`` and the Milvus collection it (or no other index folder) uses; a collection another
    folder uses is replaced only when named by ``overwrite_collection``. ``skipped``: files left out
    before encoding (:func:`gallery_files`), reported first."""
    start = time.perf_counter() if start is None else start
    skipped = list(skipped)
    # --overwrite of an index folder in use: refused while its writer (a server, the demo) runs, and held
    # until the new folder replaces it.
    writer = WriterLock.acquire(Path(out)) if overwrite and (Path(out) / INDEX_FILE).is_file() else None
    milvus: MilvusStore | None = None
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            if target.milvus is not None:
                from compir.runtime.milvus_store import MilvusStore

                milvus = MilvusStore.create(target.milvus, ndim=target.ndim, feature_shape=target.feature_shape,
                                            encoder=target.encoder, index_dir=Path(out).resolve(), overwrite=overwrite,
                                            overwrite_collection=overwrite_collection)
            gallery = Gallery(encoder=target.encoder, ndim=target.ndim, feature_shape=target.feature_shape, dtype=target.dtype,
                              hnsw=target.hnsw, folder=tmp, store=milvus)
            bar = tqdm(total=total, desc="indexing", unit="img", disable=not progress)
            for batch in batches:
                skipped.extend(batch.errors)
                if batch.ids:
                    stored = [_stored_path(path, tmp, copy_images) for path in batch.paths]
                    gallery.add(batch.ids, embeds=batch.image_embeds, features=batch.image_features, paths=stored)
                bar.update(len(batch.ids) + len(batch.errors) + batch.inserted)
            bar.close()
            gallery.save(tmp)
    except BaseException:
        if milvus is not None:
            milvus.discard()  # no half-filled collection left to refuse the retry ("already exists")
        raise
    finally:
        if writer is not None:
            writer.release()
    return BuildReport(out_dir=Path(out), count=len(gallery), skipped=tuple(skipped), seconds=time.perf_counter() - start)


def decode_for_encoder(path: Path, spec: PreprocessSpec) -> np.ndarray | str:
    """One image file -> ``pixel_values`` (3, S, S), or the reason it cannot be read (names the file)."""
    try:
        return preprocess_image(load_image(path), spec)
    except InputError as exc:
        return str(exc)


def _encoded(encoder: Encoder, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(pixels):
        return np.zeros((0, encoder.embed_dim), np.float32), np.zeros((0, *encoder.feature_shape), np.float32)
    encoded = encoder.encode_pixels(pixels)
    return encoded.image_embeds, encoded.image_features


def _decoded_batches(
    encoder: Encoder, files: Sequence[Path], ids: Sequence[str], batch_size: int, workers: int
) -> Iterator[tuple[list[str], list[Path], np.ndarray, list[tuple[str, str]]]]:
    """Batches of (ids, paths, pixel_values (B, 3, S, S), decode failures), in file order.

    Decoding and preprocessing run in a thread pool (PIL releases the GIL while it decodes and
    resizes) while the previous batch is being encoded. At most two batches are decoded ahead, so
    memory stays flat however large the gallery is.
    """
    spec = encoder.manifest.preprocess

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = _ahead(pool, partial(decode_for_encoder, spec=spec), files, window=2 * batch_size)
        batch_ids: list[str] = []
        batch_paths: list[Path] = []
        arrays: list[np.ndarray] = []
        errors: list[tuple[str, str]] = []
        for item_id, path, result in zip(ids, files, results, strict=True):
            if isinstance(result, str):
                errors.append((str(path), result))
            else:
                batch_ids.append(item_id)
                batch_paths.append(path)
                arrays.append(result)
            if len(arrays) == batch_size:
                yield batch_ids, batch_paths, np.stack(arrays), errors
                batch_ids, batch_paths, arrays, errors = [], [], [], []
        if arrays or errors:
            yield batch_ids, batch_paths, np.stack(arrays) if arrays else np.zeros((0,)), errors


def _ahead(
    pool: ThreadPoolExecutor, fn: Callable[[Path], np.ndarray | str], items: Iterable[Path], *, window: int
) -> Iterator[np.ndarray | str]:
    """``map(fn, items)`` in order on ``pool``, with at most ``window`` calls submitted and unread
    (``Executor.map`` would submit every item at once and hold every result)."""
    pending: deque[Future[np.ndarray | str]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _stored_path(path: Path, folder: Path, copy_images: bool) -> str:
    if not copy_images:
        return str(path)
    relative = f"{IMAGES_DIR}/{path.name}"
    target = folder / relative
    if target.exists():  # same file name in two sub-folders: keep both
        relative = f"{IMAGES_DIR}/{sha256_bytes(str(path).encode())[:12]}_{path.name}"
        target = folder / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return relative
