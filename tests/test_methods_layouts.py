"""Every method trains on FashionIQ, CIRR and Shoes files (tiny, in their exact layouts, no hidden
annotations): TG-CIR and the combiner through ``compir train``, NEUCORE and MMRef through ``compir
rerankers`` (each exported with what it trained)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from compir.cli import main
from compir.manifest import RERANKER, load_manifest
from tests.fixtures.data import write_cirr, write_fashioniq, write_shoes
from tests.test_data_readers import cirr_record

TEXTS = ["is red with long sleeves", "has a black collar", "make it a blue dress", "shorter and white", "with a floral print"]


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained micro TG-CIR checkpoint (token-set head: K regions per image) and its export."""
    from compir.export.to_onnx import export_onnx
    from compir.train.checkpoint import save_checkpoint
    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    root = tmp_path_factory.mktemp("neucore-layouts")
    torch.manual_seed(0)
    checkpoint = root / "best.pt"
    save_checkpoint(checkpoint, model=CIRModel(resolve_model_config("micro-tgcir")), metrics={}, step=0, epoch=0)
    export_onnx(checkpoint, out_dir=root / "export", calibration_count=4)
    return {"checkpoint": checkpoint, "export": root / "export"}


def _fashioniq(root: Path) -> str:
    for split, offset in (("train", 0), ("val", 10)):
        names = [f"D{offset + i}" for i in range(6)]
        records = [{"candidate": names[i], "target": names[i + 1], "captions": [TEXTS[i], TEXTS[(i + 2) % 5]]} for i in range(5)]
        write_fashioniq(root, category="dress", split=split, records=records, names=names)
    return "val"


def _cirr(root: Path) -> str:
    for split, prefix in (("train", "train"), ("val", "dev")):
        names = [f"{prefix}-{i}-0-img0" for i in range(6)]
        records = [cirr_record(i, names[i], names[i + 1], TEXTS[i], names) for i in range(5)]
        write_cirr(root, split=split, records=records, names=names)
    return "val"


def _shoes(root: Path) -> str:
    train, test = [f"img_womens_boots_{i}.jpg" for i in range(6)], [f"img_womens_pumps_{i}.jpg" for i in range(5)]
    records = [{"ImageName": names[i + 1], "ReferenceImageName": names[i], "RelativeCaption": TEXTS[i]}
               for names in (train, test) for i in range(len(names) - 1)]
    write_shoes(root, records=records, train=train, test=test)
    return "test"  # Shoes has no validation split


@pytest.mark.parametrize("layout", [_fashioniq, _cirr, _shoes], ids=["fashioniq", "cirr", "shoes"])
def test_neucore_trains_and_exports_on_each_real_layout(layout, micro_export, tmp_path, capsys):
    from compir.export.rerankers import add_rerankers

    data = tmp_path / "data"
    val_split = layout(data)
    checkpoint = tmp_path / "best.pt"
    shutil.copyfile(micro_export["checkpoint"], checkpoint)  # the sidecar is written beside it
    argv = ["rerankers", str(checkpoint), "--data", str(data), "--only", "neucore", "--steps", "3", "--val-split", val_split,
            "--no-progress"]
    assert main(argv) == 0
    sidecar = tmp_path / "best.neucore.pt"
    assert f"neucore: {sidecar}" in capsys.readouterr().out
    record = torch.load(sidecar, map_location="cpu", weights_only=False)
    assert record["format"] == "compir.reranker" and record["metrics"]["steps"] == 3
    export = tmp_path / "export"
    shutil.copytree(micro_export["export"], export)
    # Three steps on a few triplets may not help on val (weight 0): keep the graph to check its export.
    manifest = add_rerankers(export, checkpoint=checkpoint, keep_unapplied=True)
    assert RERANKER in manifest.variant("fp32").graphs and RERANKER in manifest.variant("fp32").parity
    assert load_manifest(export).variant("fp32").graphs[RERANKER].file.endswith("reranker.onnx")


@pytest.mark.parametrize("layout", [_fashioniq, _cirr, _shoes], ids=["fashioniq", "cirr", "shoes"])
def test_mmref_derives_identities_fine_tunes_and_exports_on_each_real_layout(layout, micro_export, tmp_path, capsys):
    """No layout labels identities: MMRef clusters the training images (auto), fine-tunes the encoders
    on the triplets and writes a checkpoint and sidecar that the export takes."""
    from compir.export.rerankers import add_rerankers
    from compir.export.to_onnx import export_onnx

    data = tmp_path / "data"
    val_split = layout(data)
    checkpoint = tmp_path / "best.pt"
    shutil.copyfile(micro_export["checkpoint"], checkpoint)
    argv = ["rerankers", str(checkpoint), "--data", str(data), "--only", "mmref", "--steps", "3", "--finetune-steps", "2",
            "--val-split", val_split, "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    finetuned = tmp_path / "mmref-finetuned.pt"
    assert "clusters" in out and f"for {finetuned}" in out
    record = torch.load(tmp_path / "mmref-finetuned.mmref.pt", map_location="cpu", weights_only=False)
    assert record["metrics"]["identity_source"] == "clusters" and record["metrics"]["finetune_steps"] == 2
    export = tmp_path / "export"
    export_onnx(finetuned, out_dir=export, calibration_count=4, variants=("fp32",))
    add_rerankers(export, checkpoint=finetuned)
    settings = json.loads((export / "rerankers.json").read_text(encoding="utf-8"))
    assert (export / "mmref_references.npy").is_file() and "mmref" in json.dumps(settings)


@pytest.mark.parametrize("model", ["micro-tgcir", "micro"], ids=["tgcir", "combiner"])
@pytest.mark.parametrize("layout", [_fashioniq, _cirr, _shoes], ids=["fashioniq", "cirr", "shoes"])
def test_composers_train_on_each_real_layout(layout, model, tmp_path):
    """TG-CIR and the combiner train on FashionIQ / CIRR / Shoes files as they are (2 steps)."""
    data = tmp_path / "data"
    val_split = layout(data)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), "--model", model, "--steps", "2", "--batch-size", "2",
            "--amp", "off", "--workers", "0", "--val-split", val_split, "--no-progress"]
    assert main(argv) == 0
    (record,) = json.loads((run / "train_log.json").read_text(encoding="utf-8"))["history"]
    assert record["step"] == 2 and "R@10" in record["metrics"]  # validated on the layout's own split
    assert (run / "best.pt").is_file()
