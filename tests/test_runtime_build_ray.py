"""``compir index build --ray``: Ray Data indexing on a local Ray gives the single-process index."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compir.errors import ContractError
from compir.runtime import build_ray
from compir.runtime.gallery import Gallery
from compir.runtime.index_cli import main as index_main
from compir.runtime.milvus_client import connect, in_filter
from compir.runtime.milvus_store import MilvusStore
from tests.fixtures.milvus_server import MilvusServer
from tests.fixtures.ray_build import assert_same_gallery

ray = pytest.importorskip("ray", reason="the ray extra is not installed")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray for the module (its start-up costs seconds); builds join it instead of starting their own."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_build_gives_the_single_process_index(
    local_ray: Any, tiny_export: Path, gallery_images: Path, single_process_index: tuple[Path, str, str], tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    reference, reference_out, reference_err = single_process_index
    out, shards = tmp_path / "index", tmp_path / "shards"
    argv = ["build", str(tiny_export), "--images", str(gallery_images), "--out", str(out), "--batch-size", "4", "--quiet",
            "--ray", "--ray-batch-size", "5", "--ray-actors", "1", "--shards", str(shards)]
    assert index_main(argv) == 0
    captured = capfd.readouterr()  # file descriptors too: Ray's C++ core worker writes to fd 2
    # Reported exactly as the single-process build reports: the same skipped lines, the same summary, and
    # nothing else: Ray's own lines (INFO, a core_worker.cc error line) went to the index's logs/ray.log.
    assert "indexed 12 images" in captured.out and "skipped 2 (unreadable, or no valid item id)" in captured.out
    assert _without_rate(captured.out, out) == _without_rate(reference_out, reference)
    assert captured.err.splitlines() == reference_err.splitlines(), captured.err
    assert "Dataset" in (out / build_ray.RAY_LOG).read_text()
    assert_same_gallery(out, reference)
    assert len(list(shards.glob("*.parquet"))) == 3  # 14 files in blocks of 5, kept where asked
    with pytest.raises(ContractError, match="already exists"):  # refused before any work
        index_main(argv)


def test_ray_into_a_milvus_server_the_encoder_actors_insert(
    milvus_server: MilvusServer, local_ray: Any, tiny_export: Path, gallery_images: Path, tmp_path: Path,
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Into a Milvus server the actors upsert their own blocks: this process (the driver) adds nothing,
    and the collection equals a single-process build's into the same server, in the same id order."""
    common = ["build", str(tiny_export), "--images", str(gallery_images), "--batch-size", "4", "--quiet",
              "--milvus-uri", milvus_server.uri]
    assert index_main([*common, "--out", str(tmp_path / "single"), "--collection", "single"]) == 0
    single = capfd.readouterr()
    driver_adds: list[int] = []
    monkeypatch.setattr(MilvusStore, "add", lambda self, ids, **_: driver_adds.append(len(ids)))  # the actors run the real one
    argv = [*common, "--out", str(tmp_path / "ray"), "--collection", "by_ray", "--ray", "--ray-batch-size", "5", "--ray-actors", "1"]
    assert index_main(argv) == 0
    built = capfd.readouterr()
    assert driver_adds == [], "the driver inserted rows"
    assert _without_rate(built.out, tmp_path / "ray") == _without_rate(single.out, tmp_path / "single")
    assert "indexed 12 images" in built.out and built.err.splitlines() == single.err.splitlines()
    ray_gallery, reference = Gallery.load(tmp_path / "ray", encoder=None), Gallery.load(tmp_path / "single", encoder=None)
    assert ray_gallery.ids == reference.ids and len(ray_gallery.ids) == 12  # file order: ``added`` is the build's start + row
    assert ray_gallery.image_paths(ray_gallery.ids) == reference.image_paths(reference.ids)
    np.testing.assert_allclose(ray_gallery.features_of(ray_gallery.ids), reference.features_of(reference.ids), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_embeds(milvus_server.uri, "by_ray", reference.ids), _embeds(milvus_server.uri, "single", reference.ids),
                               rtol=0, atol=1e-6)


def _embeds(uri: str, collection: str, ids: list[str]) -> np.ndarray:
    rows = connect(uri).query(collection, filter=in_filter("id", ids), output_fields=["id", "embed"], consistency_level="Strong")
    found = {row["id"]: row["embed"] for row in rows}
    return np.asarray([found[item] for item in ids], np.float32)


def test_a_crashed_encoder_actor_has_its_batch_retried(
    local_ray: Any, tiny_export: Path, gallery_images: Path, single_process_index: tuple[Path, str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = tmp_path / "crashed"

    class CrashOnce(build_ray._EncodeRows):
        """The first call of the first actor kills its process (as an OOM kill or a lost node would)."""

        def __call__(self, batch: dict[str, np.ndarray]) -> Any:
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    monkeypatch.setattr(build_ray, "_EncodeRows", CrashOnce)
    out = tmp_path / "index"
    report = build_ray.build_index_ray(tiny_export, images=gallery_images, out=out, actors=1, ray_batch_size=5, batch_size=4,
                                       providers=["cpu"], progress=False)
    assert marker.exists(), "the actor never crashed: the test tested nothing"
    assert report.count == 12 and len(report.skipped) == 2
    assert_same_gallery(out, single_process_index[0])


def test_ray_without_the_extra_names_it(tiny_export: Path, gallery_images: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "class Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ImportError(name=name)\n"
        "sys.meta_path.insert(0, Blocked())\n"
        "from compir.cli import main\n"
        f"sys.exit(main(['index', 'build', {str(tiny_export)!r}, '--images', {str(gallery_images)!r}, "
        f"'--out', {str(tmp_path / 'index')!r}, '--ray']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ['compir index: error: --ray needs Ray Data, which is not installed (ray): '
                                                  'pip install "compir[ray]"']
    assert not list(tmp_path.iterdir())  # nothing started, nothing left behind


def _without_rate(text: str, folder: Path) -> str:
    return re.sub(r"\([\d.]+ images/s\)", "(N images/s)", text).replace(str(folder), "INDEX")
