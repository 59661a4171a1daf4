"""CLIP4Cir: the importer against an independent re-implementation of the authors' Combiner (their
published structure, their key names), the authors' form of the combiner head, and its two stages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compir.cli import main as compir_main
from compir.errors import InputError

open_clip = pytest.importorskip("open_clip")

# A tiny ViT CLIP (the importer is family-agnostic; RN50x4 is what CLIP4Cir released).
ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# A tiny ModifiedResNet (CLIP4Cir's RN50x4 family): 64 px -> a 2 x 2 grid into the attention pool.
RESNET_ARCH = {**ARCH, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32, "patch_size": None}}
ARCHS = {"vit": ARCH, "resnet": RESNET_ARCH}
PROJECTION, HIDDEN = 4 * 32, 8 * 32  # their proportions (RN50x4: 640 -> 2560, 5120)
TEXTS = ["is red and has no sleeves", "a larger one, in blue", "remove the circle", "make it darker"]


class TheirCombiner(nn.Module):
    """CLIP4Cir's Combiner as published (src/combiner.py), written here from its description."""

    def __init__(self, clip_feature_dim: int, projection_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.text_projection_layer = nn.Linear(clip_feature_dim, projection_dim)
        self.image_projection_layer = nn.Linear(clip_feature_dim, projection_dim)
        self.dropout1 = nn.Dropout(0.5)
        self.dropout2 = nn.Dropout(0.5)
        self.combiner_layer = nn.Linear(projection_dim * 2, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, clip_feature_dim)
        self.dropout3 = nn.Dropout(0.5)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(projection_dim * 2, hidden_dim), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden_dim, 1), nn.Sigmoid()
        )

    def combine_features(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        text_projected = self.dropout1(F.relu(self.text_projection_layer(text_features)))
        image_projected = self.dropout2(F.relu(self.image_projection_layer(image_features)))
        raw_combined = torch.cat((text_projected, image_projected), -1)
        combined = self.dropout3(F.relu(self.combiner_layer(raw_combined)))
        scalar = self.dynamic_scalar(raw_combined)
        output = self.output_layer(combined) + scalar * text_features + (1 - scalar) * image_features
        return F.normalize(output, dim=-1)


@dataclass(frozen=True)
class Release:
    folder: Path
    clip: nn.Module  # open_clip's CLIP, OpenAI's key names
    combiner: TheirCombiner
    config: Path  # compir model config of the CLIP's architecture (what --model names)


def _release(folder: Path, arch: dict[str, Any]) -> Release:
    """Files in CLIP4Cir's exact format: a CLIP (OpenAI / open_clip keys, QuickGELU) and a Combiner."""
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**arch, quick_gelu=True).eval()
    with torch.no_grad():  # CLIP's logit_scale and zero-initialised parts would hide a mapping error
        for param in clip.parameters():
            if param.is_floating_point():
                param.add_(0.02 * torch.randn_like(param))
    combiner = TheirCombiner(arch["embed_dim"], PROJECTION, HIDDEN).eval()
    with torch.no_grad():
        combiner.dynamic_scalar[3].bias.fill_(0.3)  # a gate away from 0.5, so swapped inputs would show
    torch.save({"epoch": 7, "CLIP": clip.state_dict()}, folder / "tuned_clip_best.pt")
    torch.save({"epoch": 7, "Combiner": combiner.state_dict()}, folder / "combiner.pt")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps({"open_clip": arch}), encoding="utf-8")
    return Release(folder=folder, clip=clip, combiner=combiner, config=config)


@pytest.fixture(scope="module")
def vit_release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return _release(tmp_path_factory.mktemp("clip4cir-vit"), ARCH)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def released(request: pytest.FixtureRequest, vit_release: Release, tmp_path_factory: pytest.TempPathFactory) -> Release:
    if request.param == "vit":
        return vit_release
    try:  # ModifiedResNet towers return tokens through compir.train.towers (issue 13, item 1)
        import compir.train.towers  # noqa: F401
    except ImportError:
        pytest.skip("this compir cannot train ModifiedResNet towers yet")
    return _release(tmp_path_factory.mktemp(f"clip4cir-{request.param}"), ARCHS[request.param])


@pytest.fixture(scope="module")
def imported(released: Release) -> Path:
    folder = released.folder
    out = folder / "imported.pt"
    argv = ["import", "clip4cir", "--clip", str(folder / "tuned_clip_best.pt"), "--combiner", str(folder / "combiner.pt"),
            "--model", str(released.config), "--out", str(out)]
    assert compir_main(argv) == 0
    return out


def _inputs(released: Release) -> tuple[torch.Tensor, torch.Tensor]:
    size = int(json.loads(released.config.read_text(encoding="utf-8"))["open_clip"]["vision_cfg"]["image_size"])
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(TEXTS), 3, size, size, generator=generator)
    return pixels, open_clip.tokenize(TEXTS, context_length=16)


def _their_query(released: Release, pixels: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():  # their pipeline: raw encode_image / encode_text features into the combiner
        query = released.combiner.combine_features(released.clip.encode_image(pixels), released.clip.encode_text(ids))
    return query.numpy()


def test_imported_checkpoint_equals_their_combiner_in_torch(released: Release, imported: Path) -> None:
    from compir.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(imported)
    assert loaded.config.head_options == {"projection_dim": PROJECTION, "hidden_dim": HIDDEN, "dropout": 0.5,
                                          "form": "clip4cir", "stage": "combiner"}
    assert (loaded.preprocess.resize_mode, loaded.preprocess.target_ratio) == ("targetpad", 1.25)
    assert loaded.config.clip_cfg["quick_gelu"] is True
    pixels, ids = _inputs(released)
    with torch.no_grad():
        ours = loaded.model.encode_query(pixels, ids).numpy()
    theirs = _their_query(released, pixels, ids)
    assert float(np.abs(ours - theirs).max()) <= 1e-5
    # Their index vectors are normalize(encode_image): so are ours.
    with torch.no_grad():
        gallery, _, _ = loaded.model.encode_image(pixels)
        assert torch.allclose(gallery, F.normalize(released.clip.encode_image(pixels), dim=-1), atol=1e-5)


def test_imported_checkpoint_equals_their_combiner_through_the_runtime(
    released: Release, imported: Path, tmp_path: Path
) -> None:
    from compir.export.to_onnx import export_onnx
    from compir.runtime.encoder import Encoder

    export_onnx(imported, out_dir=tmp_path / "export", calibration_count=4)
    encoder = Encoder.from_export(tmp_path / "export")
    assert encoder.manifest.preprocess.resize_mode == "targetpad" and encoder.manifest.preprocess.target_ratio == 1.25
    pixels, ids = _inputs(released)
    image = encoder.encode_pixels(pixels.numpy())
    text = encoder.encode_input_ids(encoder.tokenize(TEXTS))
    np.testing.assert_array_equal(encoder.tokenize(TEXTS), ids.numpy())
    query = encoder.compose(image.image_features, text.text_features)
    assert float(np.abs(query - _their_query(released, pixels, ids)).max()) <= 1e-5


def _import(released: Release, tmp_path: Path, *, clip: Path | None = None, combiner: Path | None = None,
            model: str | None = None) -> None:
    from compir.train.clip4cir import import_clip4cir

    folder = released.folder
    import_clip4cir(clip_path=clip or folder / "tuned_clip_best.pt", combiner_path=combiner or folder / "combiner.pt",
                    model=model or str(released.config), out=tmp_path / "out.pt")


def test_wrong_files_are_refused_with_what_is_wrong(vit_release: Release, tmp_path: Path) -> None:
    released = vit_release
    folder = released.folder
    combiner = torch.load(folder / "combiner.pt", weights_only=True)["Combiner"]
    clip = torch.load(folder / "tuned_clip_best.pt", weights_only=True)["CLIP"]
    cases = {
        "swapped": ({"Combiner": combiner}, None, "expected CLIP4Cir's {'CLIP': state_dict}"),
        "missing-key": (None, {"Combiner": {k: v for k, v in combiner.items() if not k.startswith("output_layer")}},
                        r"missing keys \['output_layer.bias', 'output_layer.weight'\]"),
        "renamed-key": (None, {"Combiner": {k.replace("dynamic_scalar", "gate"): v for k, v in combiner.items()}}, "unexpected keys"),
        "shape": (None, {"Combiner": {**combiner, "combiner_layer.weight": torch.zeros(HIDDEN, PROJECTION)}}, "combiner_layer has weight"),
        "clip-keys": ({"CLIP": {k: v for k, v in clip.items() if k != "ln_final.weight"}}, None, r"missing 1 keys, e.g. \['text.ln_final"),
    }
    for name, (clip_record, combiner_record, message) in cases.items():
        paths: dict[str, Path | None] = {"clip": None, "combiner": None}
        for role, record in (("clip", clip_record), ("combiner", combiner_record)):
            if record is not None:
                paths[role] = tmp_path / f"{name}-{role}.pt"
                torch.save(record, paths[role])
        with pytest.raises(InputError, match=message):
            _import(released, tmp_path, clip=paths["clip"], combiner=paths["combiner"])
    with pytest.raises(InputError, match="does not exist"):
        _import(released, tmp_path, clip=tmp_path / "nowhere.pt")


def test_a_model_that_does_not_match_the_clip_is_named(vit_release: Release, tmp_path: Path) -> None:
    released = vit_release
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({"open_clip": {**ARCH, "vision_cfg": {**ARCH["vision_cfg"], "width": 96}}}), encoding="utf-8")
    with pytest.raises(InputError, match=r"visual\.\S+ has shape .* pass the --model it was trained with"):
        _import(released, tmp_path, model=str(wider))
    with pytest.raises(InputError, match="the Combiner takes 32-d CLIP features, the model's embedding is 64-d"):
        _import(released, tmp_path, model="micro")  # embed_dim 64
    out = tmp_path / "exists.pt"
    out.write_bytes(b"")
    code = compir_main(["import", "clip4cir", "--clip", "a.pt", "--combiner", "b.pt", "--model", "micro", "--out", str(out)])
    assert code == 2  # a one-line error, no traceback


# ---- the authors' form of the combiner head, and its two training stages ----------------------------------------------
def _head(**options: object) -> nn.Module:
    from compir.train.heads import build_head

    torch.manual_seed(0)
    return build_head("combiner", embed_dim=32, image_width=64, text_width=64,
                      options={"projection_dim": PROJECTION, "hidden_dim": HIDDEN, **options}).eval()


def test_clip4cir_form_is_their_order_and_raw_inputs_and_stage_clip_is_the_sum() -> None:
    theirs = TheirCombiner(32, PROJECTION, HIDDEN).eval()
    ours = _head(form="clip4cir")
    from compir.train.clip4cir import COMBINER_KEYS

    ours.load_state_dict({f"{mine}.{kind}": theirs.state_dict()[f"{key}.{kind}"]
                          for key, mine in COMBINER_KEYS.items() for kind in ("weight", "bias")})
    image, text = 5 * torch.randn(3, 32), 3 * torch.randn(3, 32)  # raw CLIP features are not unit length
    with torch.no_grad():
        assert torch.allclose(ours.compose(ours.image_features(image, image), ours.text_features(text, text, text)),
                              theirs.combine_features(image, text), atol=1e-6)
        compir_form = _head()
        compir_form.load_state_dict(ours.state_dict())
        # compir's form normalises first and concatenates image then text: another function
        assert not torch.allclose(compir_form.compose(F.normalize(image, dim=-1), F.normalize(text, dim=-1)),
                                  theirs.combine_features(image, text), atol=1e-3)
        summed = _head(form="clip4cir", stage="clip")
        assert torch.allclose(summed.compose(image, text), F.normalize(image + text, dim=-1))
    assert not any(p.requires_grad for p in summed.parameters())
    with pytest.raises(InputError, match="form must be one of"):
        _head(form="theirs")


def test_two_stages_train_the_towers_then_only_the_combiner(synth_data: Path, tmp_path: Path) -> None:
    from compir.train.checkpoint import load_checkpoint

    common = ["--data", str(synth_data), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--amp", "off",
              "--val-queries", "8", "--no-progress", "--warmup-steps", "1"]
    stage1 = tmp_path / "stage1"
    assert compir_main(["train", *common, "--model", "micro", "--resize-mode", "targetpad", "--head-option", "form=clip4cir",
                        "--head-option", "stage=clip", "--out", str(stage1)]) == 0
    stage2 = tmp_path / "stage2"
    assert compir_main(["train", *common, "--init", str(stage1 / "last.pt"), "--head-option", "stage=combiner",
                        "--out", str(stage2)]) == 0
    start = load_checkpoint(stage1 / "last.pt")
    end = load_checkpoint(stage2 / "last.pt")
    assert start.preprocess.resize_mode == end.preprocess.resize_mode == "targetpad"
    assert end.config.head_options["stage"] == "combiner" and end.config.head_options["form"] == "clip4cir"
    before, after = start.model.state_dict(), end.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))  # frozen in stage 2
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))  # the combiner learned
    initial = {k: v for k, v in _stage1_initial_head(start.config).items()}
    assert all(torch.equal(before[f"head.{k}"], v) for k, v in initial.items())  # stage 1 left the combiner alone


def _stage1_initial_head(config: object) -> dict[str, torch.Tensor]:
    """The head weights a stage-1 run starts from (seed 0), to show stage 1 does not train them."""
    from compir.train.config import ModelConfig
    from compir.train.model import CIRModel

    assert isinstance(config, ModelConfig)
    torch.manual_seed(0)
    return dict(CIRModel(config).head.state_dict())
