"""Bad input to the runtime: each is a clear InputError / ContractError, never a crash, hang or
wrong answer."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compir.contracts import MANIFEST_FILE, sha256_file
from compir.errors import ContractError, InputError
from compir.manifest import load_manifest
from compir.runtime.encoder import Encoder
from compir.runtime.retriever import Retriever
from compir.runtime.tokenizer import MAX_TEXT_CHARS
from compir.runtime.uploads import validate_item_id


@pytest.fixture(scope="module")
def retriever(tiny_export: Path, tiny_index: Path) -> Retriever:
    return Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb() -> bytes:
    """A 40-byte-ish PNG whose header claims 100000 x 100000 pixels."""
    data = bytearray(_png(Image.new("RGB", (8, 8))))
    body = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = body
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return bytes(data)


BAD_IMAGES = {
    "corrupt": b"\x89PNG\r\n\x1a\nthis is not a png",
    "truncated": _png(Image.effect_noise((64, 64), 50).convert("RGB"))[:200],
    "zero-byte": b"",
    "bomb": _bomb(),
    "text-file": b"hello, I am not an image\n" * 10,
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_input_errors(retriever: Retriever, name: str, tmp_path: Path) -> None:
    with pytest.raises(InputError):
        retriever.search(reference_image=BAD_IMAGES[name], text="make it red")
    path = tmp_path / f"{name}.png"
    path.write_bytes(BAD_IMAGES[name])
    with pytest.raises(InputError, match=name):
        retriever.search(reference_image=path, text="make it red")
    with pytest.raises(InputError):
        retriever.add_items({"bad": BAD_IMAGES[name]})
    assert "bad" not in retriever.item_ids()


@pytest.mark.parametrize("mode", ["L", "LA", "I;16", "CMYK", "P", "RGBA", "1"])
def test_odd_image_modes_are_searchable(retriever: Retriever, mode: str) -> None:
    if mode == "CMYK":
        image = Image.new("CMYK", (40, 30), (10, 200, 30, 0))
    else:
        image = Image.effect_noise((40, 30), 60).convert(mode if mode != "I;16" else "I").convert(mode)
    hits = retriever.search(reference_image=image, text="make it red", k=3)
    assert len(hits) == 3 and all(np.isfinite(h.score) for h in hits)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "\u3000\u00a0"])
def test_blank_text_is_refused(retriever: Retriever, text: str) -> None:
    item = retriever.item_ids()[0]
    for reference in (item, None):
        with pytest.raises(InputError, match="empty"):
            retriever.search(reference_id=reference, text=text)


@pytest.mark.parametrize("text", ["\x00", "\x7f", "\ufeff", "&nbsp;", "&#32;", " &nbsp; \x00\ufeff "])
def test_text_the_tokenizer_reduces_to_nothing_is_refused(retriever: Retriever, text: str) -> None:
    assert retriever.encoder.tokenizer.encode(text) == []  # what the rule is about
    for kwargs in ({"reference_id": retriever.item_ids()[0]}, {}):
        with pytest.raises(InputError, match="text is empty"):
            retriever.search(text=text, **kwargs)
    with pytest.raises(InputError, match="query 1: text is empty"):
        retriever.search_batch([{"text": "make it red"}, {"text": text}])
    assert retriever.search(text="&amp; \x00red", k=1)  # something left: searched


@pytest.mark.parametrize("item_id", ["../escape", "a/../b", "/etc/passwd", "a\\b", "a//b", "a/", "./a", " a", "a\x00b", "a\x7f", "x" * 257])
def test_item_ids_outside_the_grammar_are_refused(retriever: Retriever, item_id: str) -> None:
    with pytest.raises(InputError, match="item id"):
        retriever.add_items({item_id: Image.new("RGB", (8, 8))})
    assert item_id not in retriever.item_ids()


def test_relative_path_ids_are_accepted() -> None:
    for item_id in ("a", "a/b", "a/b.png", "shoes/b1 2", "C:/x", "café"):
        assert validate_item_id(item_id) == item_id


def test_long_text_is_truncated_and_huge_text_refused(retriever: Retriever) -> None:
    context = retriever.encoder.tokenizer.context_length
    long_text = "make it red " * context  # far more tokens than the context
    assert retriever.search(text=long_text, k=2) == retriever.search(
        text="make it red " * (context + 5), k=2
    )
    with pytest.raises(InputError, match="limit"):
        retriever.search(text="a" * (MAX_TEXT_CHARS + 1))
    with pytest.raises(InputError, match="string"):
        retriever.search(text=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3", None])
def test_bad_k_is_refused(retriever: Retriever, k: object) -> None:
    with pytest.raises(InputError, match="k must be"):
        retriever.search(text="red", k=k)  # type: ignore[arg-type]


def test_k_larger_than_the_gallery_is_clamped(retriever: Retriever) -> None:
    count = len(retriever)
    assert len(retriever.search(text="red", k=count + 100)) == count
    item = retriever.item_ids()[0]
    assert len(retriever.search(reference_id=item, text="red", k=10**6)) == count - 1
    assert len(retriever.search(text="red", k=np.int64(3))) == 3


def test_unknown_item_ids(retriever: Retriever) -> None:
    with pytest.raises(InputError, match="reference_id 'no-such-item': no such item in the gallery"):
        retriever.search(reference_id="no-such-item", text="red")
    with pytest.raises(InputError, match="unknown item id"):
        retriever.item_image_path("no-such-item")
    with pytest.raises(InputError, match="unknown item id"):
        retriever.remove_items(["no-such-item"])
    with pytest.raises(InputError, match="item id"):
        retriever.add_items({"": Image.new("RGB", (8, 8))})
    with pytest.raises(InputError, match="reference_image must be"):
        retriever.search(reference_image=42, text="red")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="reference_id must be"):
        retriever.search(reference_id=42, text="red")  # type: ignore[arg-type]


def test_the_reference_is_explicit(retriever: Retriever) -> None:
    """A gallery id is never read as a path and a path never as an id; both at once is refused."""
    item = retriever.item_ids()[0]
    path = retriever.item_image_path(item)
    assert path is not None
    with pytest.raises(InputError, match="not both"):
        retriever.search(reference_image=path, reference_id=item, text="red")
    with pytest.raises(InputError, match=f"reference_image {item!r} is not a file"):
        retriever.search(reference_image=item, text="red")
    with pytest.raises(InputError, match="no such item"):
        retriever.search(reference_id=str(path), text="red")
    # An upload is not a gallery item: the item itself may be among the hits; by id it never is.
    assert item in [h.item_id for h in retriever.search(reference_image=path, text="red", k=len(retriever))]
    assert item not in [h.item_id for h in retriever.search(reference_id=item, text="red", k=len(retriever))]


def _copy_export(tiny_export: Path, tmp_path: Path) -> Path:
    target = tmp_path / "export"
    shutil.copytree(tiny_export, target)
    return target


def _edit_manifest(export_dir: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = export_dir / MANIFEST_FILE
    record = json.loads(path.read_text())
    edit(record["variants"][record.get("default_variant", "fp32")]["graphs"])
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        ("rename-output", "image_encoder graph .* declares output 'image_embedz'"),
        ("wrong-dim", "text_encoder graph .* input 'input_ids': axis 1"),
        ("wrong-dtype", "composer graph .* input 'text_features': the manifest says int64"),
        ("fixed-batch", "pixel_values': axis 0 is fixed to 4 in the manifest but dynamic in the graph"),
    ],
)
def test_manifest_that_lies_about_its_graphs_is_refused(tiny_export: Path, tmp_path: Path, lie: str, message: str) -> None:
    export_dir = _copy_export(tiny_export, tmp_path)

    def edit(graphs: dict) -> None:  # type: ignore[type-arg]
        if lie == "rename-output":
            graphs["image_encoder"]["outputs"][0]["name"] = "image_embedz"
        elif lie == "wrong-dim":
            shape = graphs["text_encoder"]["inputs"][0]["shape"]  # a fixed length the graph does not have
            shape[1] = shape[1] + 1 if isinstance(shape[1], int) else 78
        elif lie == "wrong-dtype":
            graphs["composer"]["inputs"][1]["dtype"] = "int64"
        else:
            graphs["image_encoder"]["inputs"][0]["shape"][0] = 4

    _edit_manifest(export_dir, edit)
    with pytest.raises(ContractError, match=message):
        Encoder.from_export(export_dir, providers=["cpu"])


def test_index_is_bound_to_its_image_encoder_not_to_the_manifest_bytes(
    tiny_checkpoint: Path, micro_export: Path, synth_data: Path, tiny_export: Path, tiny_index: Path, tmp_path: Path
) -> None:
    from compir.export.to_onnx import export_onnx
    from tests.fixtures.export import FIXTURE_VARIANTS

    again = tmp_path / "again"  # the same checkpoint exported a second time, as the fixture does
    export_onnx(tiny_checkpoint, out_dir=again, variants=FIXTURE_VARIANTS, calibration_data=synth_data, calibration_count=16)
    graph = load_manifest(again).graph("image_encoder").file
    assert (again / graph).read_bytes() == (tiny_export / graph).read_bytes()
    same = Retriever.from_dirs(again, tiny_index, providers=["cpu"])
    first = Retriever.from_dirs(tiny_export, tiny_index, providers=["cpu"])
    assert same.search(text="make it red", k=5) == first.search(text="make it red", k=5)
    edited = _copy_export(tiny_export, tmp_path)
    _edit_manifest(edited, lambda graphs: None)  # same content, new bytes: still the same encoder
    assert len(Retriever.from_dirs(edited, tiny_index, providers=["cpu"])) == len(first)

    with pytest.raises(ContractError, match="built with another encoder .image encoder graph sha256"):
        Retriever.from_dirs(micro_export, tiny_index, providers=["cpu"])  # a different model


def test_damaged_graph_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    export_dir = _copy_export(tiny_export, tmp_path)
    graph = export_dir / load_manifest(export_dir, verify_files=False).graph("composer").file
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(ContractError, match="damaged"):
        Encoder.from_export(export_dir)


def test_damaged_index_is_refused_by_the_retriever(tiny_export: Path, tiny_index: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    shutil.copytree(tiny_index, index_dir)
    record = json.loads((index_dir / "index.json").read_text())
    vectors = index_dir / record["files"]["vectors"]["file"]
    vectors.write_bytes(vectors.read_bytes()[: vectors.stat().st_size // 2])
    assert sha256_file(vectors) != record["files"]["vectors"]["sha256"]
    with pytest.raises(ContractError, match="index vectors file"):
        Retriever.from_dirs(tiny_export, index_dir, providers=["cpu"])
    with pytest.raises(ContractError, match="does not exist"):
        Retriever.from_dirs(tiny_export, tmp_path / "missing", providers=["cpu"])


def test_unknown_backend_and_provider(tiny_export: Path) -> None:
    with pytest.raises(InputError, match="unknown backend"):
        Encoder.from_export(tiny_export, backend="tpu")
    with pytest.raises(ContractError, match="none of the providers"):
        Encoder.from_export(tiny_export, providers=["NoSuchExecutionProvider"])
