"""Zero-shot at real sizes: open_clip's ViT-B-32 and ViT-L-14 (random weights, loaded from a local weights file as
``--pretrained FILE`` loads them) with the Pic2Word head -> export (fp32, parity <= 1e-4 against torch) -> index
build -> search -> eval through the runtime, after 2 training steps of the mapping net: these check mechanics and sizes.

Slow (CPU minutes: ViT-B-32 about 1.5, ViT-L-14 several): run with ``-m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compir.cli import main as compir_main
from compir.manifest import load_manifest
from tests.fixtures.index import index_first_images


@pytest.fixture(scope="module")
def sized_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compir.data.synth import SynthConfig
    from compir.data.synth_write import write_synthetic

    root = tmp_path_factory.mktemp("zs-sizes") / "data"
    write_synthetic(root, seed=5, config=SynthConfig(n_train=4, n_val=2, n_test=4), workers=1)
    return root


def _checkpoint_from_weights_file(name: str, data: Path, folder: Path) -> Path:
    """A random open_clip ``name`` saved as a plain state dict (the format of open_clip's weight files), then 2 steps
    of Pic2Word's training from it (``compir train --pretrained FILE --head pic2word``): the towers stay the file's."""
    import open_clip

    from compir.train.checkpoint import load_checkpoint

    torch.manual_seed(0)
    clip = open_clip.create_model(name)
    weights = folder / f"{name}.pt"
    torch.save(clip.state_dict(), weights)
    run = folder / "run"
    assert compir_main(["train", "--data", str(data), "--model", name, "--pretrained", str(weights), "--head", "pic2word",
                        "--steps", "2", "--steps-per-epoch", "2", "--batch-size", "2", "--val-queries", "2", "--amp", "off",
                        "--out", str(run), "--no-progress"]) == 0
    log = json.loads((run / "train_log.json").read_text())
    assert log["head"] == "pic2word" and log["history"][-1]["step"] == 2
    model = load_checkpoint(run / "best.pt").model
    # the frozen towers are the file's, not a fresh random draw, after the mapping net's steps
    assert torch.equal(model.backbone.text.token_embedding.weight, clip.token_embedding.weight)
    assert torch.equal(model.backbone.visual.conv1.weight, clip.visual.conv1.weight)
    return run / "best.pt"


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ViT-L-14 on 2 shared cores
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14"])
def test_real_size_zero_shot_exports_indexes_searches_and_evaluates(name: str, sized_data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = _checkpoint_from_weights_file(name, sized_data, tmp_path)
    export = tmp_path / "export"
    assert compir_main(["export", "onnx", str(checkpoint), "--out", str(export), "--variants", "fp32",
                        "--calibration-data", str(sized_data), "--calibration-count", "4"]) == 0
    assert "TensorRT lint: fp32 parse" in capsys.readouterr().out
    manifest = load_manifest(export)
    parity = manifest.variant("fp32").parity
    assert set(parity) == {"image_encoder", "text_encoder", "token_mapper", "prompt_encoder"} and max(parity.values()) <= 1e-4
    width = 768 if name == "ViT-L-14" else 512  # the text tower's token width: the pseudo token's
    assert manifest.graph("token_mapper").output("pseudo_tokens").shape == ("batch", width)

    index, reference = index_first_images(export, sized_data, tmp_path)
    capsys.readouterr()
    assert compir_main(["search", str(export), str(index), "--reference-id", reference, "--text", "make it red", "-k", "3",
                        "--json", "--timings"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["hits"]) == 3 and reference not in [hit["item_id"] for hit in record["hits"]]
    assert {"token_map", "prompt_encode"} <= set(record["timings_ms"])
    report = tmp_path / "eval.json"
    assert compir_main(["eval", str(export), "--data", str(sized_data), "--split", "test", "--json", str(report), "--no-progress"]) == 0
    assert "R@10" in report.read_text()
