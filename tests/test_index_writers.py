"""One writer per index (issue 23, item 4): the writer lock of a usearch folder, taken by `compir
serve`, the demo, `index build --overwrite` and a writable Retriever, never left stale by kill -9;
Milvus Lite held by another process, a deleted Milvus Lite file, and `--overwrite` of a collection
that another index folder uses."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from compir.cli import main as compir_main
from compir.errors import ContractError, InputError
from compir.runtime.build import EncodedBatch, IndexTarget, write_index
from compir.runtime.gallery import Gallery
from compir.runtime.retriever import Retriever
from tests.fixtures.service import free_port

SERVE_START_S = 120  # a loaded 2-core machine



@pytest.fixture
def serving(tiny_export: Path, tiny_index: Path, tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """`compir serve` on a copy of the tiny index, in a subprocess, once it listens."""
    index = tmp_path / "index"
    shutil.copytree(tiny_index, index)
    command = [sys.executable, "-m", "compir.cli", "serve", str(tiny_export), str(index), "--port", str(free_port()),
               "--providers", "cpu", "--log-level", "warning"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SERVE_START_S
        assert server.stderr is not None
        while time.monotonic() < deadline:
            line = server.stderr.readline()
            if "http://127.0.0.1" in line or not line:
                break
        assert server.poll() is None, "compir serve did not start"
        yield index, server
    finally:
        server.kill()
        server.wait()


def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(
        tiny_export: Path, synth_data: Path, serving: tuple[Path, subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]) -> None:
    index, server = serving
    holder = f"pid {server.pid}"
    second = subprocess.run([sys.executable, "-m", "compir.cli", "serve", str(tiny_export), str(index), "--port", str(free_port()),
                             "--providers", "cpu"], capture_output=True, text=True, timeout=SERVE_START_S)
    err = second.stderr.strip()
    assert second.returncode == 2 and len(err.splitlines()) == 1 and holder in err and "one writer per index" in err, err
    argv = ["index", "build", str(tiny_export), "--images", str(synth_data / "images"), "--out", str(index), "--overwrite",
            "--quiet"]
    assert compir_main(argv) == 2
    assert holder in capsys.readouterr().err and (index / "index.json").is_file()
    from compir.demo.cli import check_before_start
    from compir.demo.session import DemoSession

    with pytest.raises(ContractError, match=holder):
        check_before_start(tiny_export, index, port=free_port())  # `compir demo`, before Gradio loads
    with pytest.raises(ContractError, match=holder):
        DemoSession(tiny_export, index)
    reader = Retriever.from_dirs(tiny_export, index, providers=["cpu"])  # read-only opens stay allowed
    assert reader.search(text="a red circle", k=3)
    with pytest.raises(ContractError, match=holder):  # ... until they write
        reader.remove_items([reader.item_ids()[0]])
    server.send_signal(signal.SIGKILL)
    server.wait()
    writer = Retriever.from_dirs(tiny_export, index, providers=["cpu"], writable=True)  # the kernel dropped the lock
    assert writer.remove_items([writer.item_ids()[0]]) == 1
    writer.save()
    writer.close()


def test_a_write_after_another_process_saved_is_refused(tiny_index: Path, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(tiny_index, index)
    stale = Gallery.load(index, encoder=None, manifest_sha256=None)
    fresh = Gallery.load(index, encoder=None, writable=True)
    with pytest.raises(ContractError, match="open for writing by another process"):
        Gallery.load(index, encoder=None, writable=True)  # two opens conflict even within one process
    fresh.remove([fresh.ids[0]])
    fresh.save()
    fresh.close()
    with pytest.raises(ContractError, match="saved by another process since"):
        stale.remove([stale.ids[1]])


# ---- Milvus Lite ----------------------------------------------------------------------------------
needs_milvus = pytest.mark.skipif(importlib.util.find_spec("milvus_lite") is None, reason="the milvus extra is not installed")


def _build(export: Path, images: Path, out: Path, db: Path, *extra: str) -> int:
    return compir_main(["index", "build", str(export), "--images", str(images), "--out", str(out), "--milvus-uri", str(db),
                        "--collection", "c", "--quiet", "--workers", "1", *extra])


@pytest.fixture
def few_images(synth_data: Path, tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((synth_data / "images").iterdir())[:5]:
        shutil.copyfile(source, images / source.name)
    return images


@needs_milvus
def test_milvus_lite_held_by_another_process_is_one_line(tiny_export: Path, few_images: Path, tmp_path: Path) -> None:
    assert _build(tiny_export, few_images, tmp_path / "a", tmp_path / "g.db") == 0  # this process now holds g.db
    other = subprocess.run([sys.executable, "-m", "compir.cli", "search", str(tiny_export), str(tmp_path / "a"), "--text", "red",
                            "--providers", "cpu"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"compir search: error: another process (pid {os.getpid()}) holds the Milvus Lite file {tmp_path / 'g.db'}: Milvus Lite "
        "serves one process per file; stop that one, or share one gallery between processes through a Milvus server "
        "(--milvus-uri http://host:19530)"], other.stderr


@needs_milvus
def test_a_deleted_milvus_lite_file_is_an_error_not_a_new_empty_file(tiny_export: Path, few_images: Path, tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    assert _build(tiny_export, few_images, tmp_path / "a", db) == 0
    moved = tmp_path / "elsewhere.db"
    db.rename(moved)
    with pytest.raises(ContractError, match=r"Milvus Lite file .*g\.db does not exist \(moved or deleted\?\)"):
        Gallery.load(tmp_path / "a", encoder=None)
    assert not db.exists()


@needs_milvus
def test_overwrite_never_takes_the_collection_of_another_index_unless_named(
        tiny_export: Path, few_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, first, second = tmp_path / "g.db", tmp_path / "first", tmp_path / "second"
    assert _build(tiny_export, few_images, first, db) == 0
    assert _build(tiny_export, few_images, second, db, "--overwrite") == 2
    assert f"is used by index folder {first}" in capsys.readouterr().err and not second.exists()
    assert _build(tiny_export, few_images, first, db, "--overwrite") == 0  # its own collection: fine
    assert _build(tiny_export, few_images, second, db, "--overwrite-collection", "other") == 2
    assert "must repeat --collection" in capsys.readouterr().err
    (few_images / sorted(os.listdir(few_images))[0]).unlink()
    assert _build(tiny_export, few_images, second, db, "--overwrite-collection", "c") == 0  # asked by name
    assert len(Gallery.load(second, encoder=None)) == 4 and len(Gallery.load(first, encoder=None)) == 4  # one collection


@needs_milvus
def test_a_failed_build_leaves_no_collection_and_the_retry_works(tiny_export: Path, tmp_path: Path) -> None:
    from compir.manifest import load_manifest
    from compir.runtime.milvus_store import MilvusConfig

    manifest = load_manifest(tiny_export)
    target = IndexTarget(encoder=manifest.encoder_fingerprint(), ndim=4, feature_shape=(2, 3),
                         milvus=MilvusConfig(uri=str(tmp_path / "g.db"), collection="c"))
    batch = EncodedBatch(["a", "b"], [Path("a.png"), Path("b.png")], np.eye(2, 4, dtype=np.float32), np.ones((2, 2, 3), np.float32), [])

    def failing() -> Iterator[EncodedBatch]:
        yield batch
        raise InputError("the encoder failed on the second batch")

    with pytest.raises(InputError, match="second batch"):
        write_index(failing(), target=target, out=tmp_path / "out", total=4, progress=False)
    assert not (tmp_path / "out").exists()
    report = write_index(iter([batch]), target=target, out=tmp_path / "out", total=2, progress=False)  # not "already exists"
    assert report.count == 2 and json.loads((tmp_path / "out" / "index.json").read_text())["count"] == 2


@needs_milvus
def test_serving_a_milvus_index_prints_compirs_lines_not_faiss_loader_ones(tiny_export: Path, few_images: Path,
                                                                           tmp_path: Path) -> None:
    build = [sys.executable, "-m", "compir.cli", "index", "build", str(tiny_export), "--images", str(few_images), "--out",
             str(tmp_path / "a"), "--milvus-uri", str(tmp_path / "g.db"), "--quiet", "--workers", "1"]
    built = subprocess.run(build, capture_output=True, text=True, timeout=300)  # its own process: it lets go of g.db
    assert built.returncode == 0 and not built.stderr, built.stderr
    serve = [sys.executable, "-m", "compir.cli", "serve", str(tiny_export), str(tmp_path / "a"), "--port", str(free_port()),
             "--providers", "cpu", "--log-level", "info"]
    server = subprocess.Popen(serve, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert server.stderr is not None
        while not lines or "http://127.0.0.1" not in lines[-1]:
            lines.append(server.stderr.readline())
            assert lines[-1], "".join(lines)
    finally:
        server.kill()
        server.wait()
    assert not [line for line in lines if "faiss" in line], "".join(lines)
