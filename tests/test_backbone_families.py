"""Every open_clip vision tower family, end to end through the CLI, and how weights are loaded.

The matrix: a tiny random configuration of each family (ViT, ViT with QuickGELU, OpenAI's
ModifiedResNet, a timm ConvNeXt) goes ``compir train`` (2 steps) -> ``compir export onnx`` (fp32 with
parity <= 1e-4 against torch; fp16, int8-dynamic and int8-static with cosine >= 0.99 to fp32) ->
``compir index build`` -> ``compir search`` -> ``compir eval``; the export's TensorRT parser lint passes
every variant engines are built from (fp32, fp16, int8-static).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from compir.cli import main as compir_main
from compir.errors import InputError
from compir.export.variants import VARIANTS
from compir.train.config import resolve_model_config
from compir.train.model import CIRModel, resolve_activation
from compir.train.towers import encode_vision, vision_family
from tests.fixtures.index import index_first_images

_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
_TGCIR = {"name": "tgcir", "global_tokens": 2, "local_tokens": 2, "hidden_dim": 32, "matching_temperature": 0.1}
_COMBINER = {"name": "combiner", "projection_dim": 64, "hidden_dim": 64, "dropout": 0.1}
# family -> (open_clip architecture, head, expected image tokens (count, width))
FAMILIES: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[int, int]]] = {
    "vit": ({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": _TEXT}, _TGCIR, (16, 32)),
    "vit-quickgelu": ({"embed_dim": 32, "quick_gelu": True, "text_cfg": _TEXT,
                       "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}}, _COMBINER, (16, 32)),
    # ModifiedResNet: the tokens are the attention pool's input grid, (64 / 32)^2 cells of width 8 * 32.
    "resnet": ({"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
                "text_cfg": _TEXT}, _TGCIR, (4, 256)),
    # timm's ConvNeXt (its test-size variant): the trunk's final 2 x 2 feature map.
    "timm-convnext": ({"embed_dim": 32, "vision_cfg": {"image_size": 64, "timm_model_name": "test_convnext", "timm_pool": "",
                                                       "timm_proj": "linear"}, "text_cfg": _TEXT}, _TGCIR, (4, 64)),
}


@pytest.fixture(scope="module")
def family_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compir.data.synth import SynthConfig
    from compir.data.synth_write import write_synthetic

    root = tmp_path_factory.mktemp("families") / "data"
    write_synthetic(root, seed=3, config=SynthConfig(n_train=32, n_val=8, n_test=16), workers=1)
    return root


def _config_file(folder: Path, family: str) -> Path:
    arch, head, _ = FAMILIES[family]
    path = folder / f"{family}.json"
    path.write_text(json.dumps({"open_clip": arch, "head": head, "loss_weights": {"composed": 1.0}}))
    return path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_exports_indexes_searches_and_evaluates(
    family: str, family_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, export = tmp_path / "run", tmp_path / "export"
    train = ["train", "--data", str(family_data), "--out", str(run), "--model", str(_config_file(tmp_path, family)),
             "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--amp", "off", "--no-progress"]
    assert compir_main(train) == 0
    header = capsys.readouterr().out
    expected_family = family.split("-")[0]
    tokens, width = FAMILIES[family][2]
    assert f"backbone: vision tower {expected_family} " in header and f"width {width})" in header
    assert ("activation QuickGELU" in header) == (family == "vit-quickgelu")

    assert compir_main(["export", "onnx", str(run / "best.pt"), "--out", str(export), "--variants", ",".join(VARIANTS),
                        "--calibration-data", str(family_data), "--calibration-count", "4"]) == 0
    printed = capsys.readouterr()  # the TensorRT parser lint of every variant: none that engines are built from is refused
    assert "warning: TensorRT lint" not in printed.err, printed.err
    assert "TensorRT lint: fp32, fp16, int8-static parse on TensorRT 10.3, 10.15" in printed.out
    manifest = json.loads((export / "manifest.json").read_text())
    parity = manifest["variants"]["fp32"]["parity"]  # max abs difference to torch
    assert set(parity) >= {"image_encoder", "text_encoder", "composer"} and max(parity.values()) <= 1e-4
    for variant in VARIANTS[1:]:  # mean cosine of each graph's embedding to fp32
        assert min(manifest["variants"][variant]["parity"].values()) >= 0.99, (variant, manifest["variants"][variant]["parity"])
    patches = next(o for o in manifest["variants"]["fp32"]["graphs"]["image_encoder"]["outputs"] if o["name"] == "patch_features")
    assert patches["shape"] == ["batch", tokens, width]

    index, reference = index_first_images(export, family_data, tmp_path)
    capsys.readouterr()
    assert compir_main(["search", str(export), str(index), "--reference-id", reference, "--text", "make it red", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 3 and reference not in [hit["item_id"] for hit in hits]

    report = tmp_path / "eval.json"
    assert compir_main(["eval", str(export), "--data", str(family_data), "--split", "test", "--json", str(report), "--no-progress"]) == 0
    assert "R@10" in report.read_text() or "recall" in report.read_text()


@pytest.mark.parametrize("family", ["resnet", "timm-convnext"])
def test_pooled_output_is_the_towers_own(family: str, tmp_path: Path) -> None:
    """encode_vision adds tokens without changing what the tower returns (pretrained weights keep their meaning)."""
    torch.manual_seed(0)
    model = CIRModel(resolve_model_config(_config_file(tmp_path, family))).eval()
    size = model.config.image_size
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        pooled, tokens = encode_vision(model.backbone.visual, pixels)
        assert torch.equal(pooled, model.backbone.visual(pixels))
    assert vision_family(model.backbone.visual) == family.split("-")[0] and tokens.shape == (2, *FAMILIES[family][2])


# ---- weights as trained ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "tag", "quick"), [
    ("ViT-B-32", "openai", True), ("RN50", "openai", True), ("ViT-B-32", "laion2b_s34b_b79k", False),
    ("ViT-B-32-quickgelu", "laion400m_e32", True), ("ViT-B-16", "openai", True),
])
def test_pretrained_tags_choose_the_activation_they_were_trained_with(name: str, tag: str, quick: bool) -> None:
    config, note = resolve_activation(resolve_model_config(name), tag)  # open_clip's tag records only: no download
    assert config.clip_cfg["quick_gelu"] is quick
    assert repr(tag) in note and ("QuickGELU" in note) == quick


def test_openai_on_a_gelu_config_says_it_overrides_and_unknown_tags_are_input_errors() -> None:
    _, note = resolve_activation(resolve_model_config("ViT-B-32"), "openai")
    assert note == "pretrained 'openai' was trained with QuickGELU; the config's GELU overridden"
    with pytest.raises(InputError, match="neither a file nor a pretrained tag of 'ViT-B-32'.*openai"):
        resolve_activation(resolve_model_config("ViT-B-32"), "no-such-tag")


def _openai_clip(arch: dict[str, Any]) -> nn.Module:
    """A random CLIP in OpenAI's own layout (open_clip's CLIP class: top-level text keys)."""
    from open_clip.model import CLIP

    torch.manual_seed(1)
    return CLIP(**arch).eval()


class _OpenAIArchive(nn.Module):
    """What OpenAI's released .pt files hold: the CLIP's weights plus three int settings, as TorchScript."""

    def __init__(self, clip: nn.Module, *, image_size: int, context_length: int) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, value in {"input_resolution": image_size, "context_length": context_length, "vocab_size": 49408}.items():
            self.register_buffer(name, torch.tensor(value))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)  # type: ignore[no-any-return]


@pytest.mark.parametrize("family", ["vit", "resnet"])
@pytest.mark.parametrize("fmt", ["torchscript", "state_dict"])
def test_local_openai_weights_load_as_trained(family: str, fmt: str, tmp_path: Path) -> None:
    arch = FAMILIES[family][0]
    clip = _openai_clip({**arch, "quick_gelu": True})
    size = arch["vision_cfg"]["image_size"]
    path = tmp_path / f"{family}.pt"
    if fmt == "torchscript":
        archive = _OpenAIArchive(clip, image_size=size, context_length=_TEXT["context_length"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks inside attention
            torch.jit.trace(archive, torch.randn(1, 3, size, size), check_trace=False).save(str(path))
    else:
        torch.save(clip.state_dict(), path)  # OpenAI's key names in a plain state dict (open_clip converts them)
    # A TorchScript archive is OpenAI's release: QuickGELU is chosen whatever the config says. An
    # open_clip-format file keeps the config's activation (here a -quickgelu style config).
    config_arch = arch if fmt == "torchscript" else {**arch, "quick_gelu": True}
    config = _write(tmp_path / "config.json", {"open_clip": config_arch, "head": FAMILIES[family][1]})
    model = CIRModel(resolve_model_config(config), pretrained=str(path)).eval()
    assert model.config.clip_cfg["quick_gelu"] is True
    assert ("TorchScript" in model.activation_note) == (fmt == "torchscript")
    pixels = torch.randn(2, 3, size, size)
    ids = torch.randint(1, 49000, (2, _TEXT["context_length"]))
    with torch.no_grad():
        assert torch.allclose(encode_vision(model.backbone.visual, pixels)[0], clip.encode_image(pixels), atol=1e-5)
        assert torch.allclose(model.backbone.text(ids)[0], clip.encode_text(ids), atol=1e-5)


def _write(path: Path, record: dict[str, Any]) -> Path:
    path.write_text(json.dumps(record))
    return path


def test_coca_is_a_one_line_input_error() -> None:
    with pytest.raises(InputError, match=r"CoCa models \(towers plus a captioning decoder\) are not supported"):
        CIRModel(resolve_model_config("coca_ViT-B-32"))
