"""Non-CLIP text towers end to end: a Hugging Face text tower (open_clip's ``hf_model_name``) and a
SigLIP2-style text tower with its Gemma tokenizer, each train 2 steps -> export fp32 (parity
<= 1e-4) -> index -> search through the CLIs, on tiny local stand-ins (tests/fixtures/text_towers.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compir.cli import main as compir_main
from compir.errors import InputError
from compir.manifest import load_manifest
from compir.runtime.encoder import Encoder, fit_length
from tests.fixtures.text_towers import build_text_tower, build_tokenizer

pytest.importorskip("transformers", reason="HF text towers need transformers")

_VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
_TGCIR = {"name": "tgcir", "global_tokens": 1, "local_tokens": 2, "hidden_dim": 32, "matching_temperature": 0.1}
_COMBINER = {"name": "combiner", "projection_dim": 64, "hidden_dim": 64, "dropout": 0.1}


# HF tower family -> (its tokenizer family, open_clip's pooler for it), as open_clip's configs pair them.
_HF_TOWERS = {
    "xlm-roberta": ("xlm-roberta", "mean_pooler"),  # xlm-roberta-base-ViT-B-32, xlm-roberta-large-ViT-H-14
    "bert": ("bert", "cls_pooler"),  # a BERT tower: the CLS pooler drops token 0 from the token states
    "roberta": ("roberta", "mean_pooler"),  # roberta-ViT-B-32
    "mt5": ("mt5", "mean_pooler"),  # mt5-base-ViT-B-32, mt5-xl-ViT-H-14 (the encoder of an encoder-decoder)
    "nllb": ("xlm-roberta", "cls_pooler"),  # nllb-clip-* (M2M100's encoder; its real tokenizer is sentencepiece too)
}


def _config(family: str, root: Path) -> dict[str, Any]:
    """A compir model config JSON: a tiny plain ViT and the text tower of ``family``, as open_clip's
    own configs of that family write it (pointed at local folders)."""
    if family in _HF_TOWERS:
        tokenizer_family, pooler = _HF_TOWERS[family]
        tower = str(build_text_tower(root / f"{family}-model", family))
        tokenizer = str(build_tokenizer(root / f"{family}-tokenizer", tokenizer_family))
        text_cfg: dict[str, Any] = {"hf_model_name": tower, "hf_tokenizer_name": tokenizer, "hf_pooler_type": pooler,
                                    "hf_proj_type": "linear", "context_length": 24}
        return {"open_clip": {"embed_dim": 32, "vision_cfg": _VISION, "text_cfg": text_cfg}, "head": _TGCIR,
                "loss_weights": {"composed": 1.0, "teacher": 0.5, "matching": 1.0, "caption": 0.5}}
    # like ViT-B-16-SigLIP2: open_clip's TextTransformer, 64 tokens, last-token pooling, Gemma tokenizer
    tokenizer = str(build_tokenizer(root / "siglip2-tokenizer", "siglip2"))
    text_cfg = {"context_length": 64, "vocab_size": 800, "hf_tokenizer_name": tokenizer, "tokenizer_kwargs": {"clean": "canonicalize"},
                "width": 32, "heads": 2, "layers": 1, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}}
    return {"open_clip": {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True, "vision_cfg": _VISION, "text_cfg": text_cfg},
            "head": _COMBINER, "loss_weights": {"composed": 1.0, "caption": 0.5}}


@pytest.mark.parametrize("family", ["xlm-roberta", "bert", "siglip2"])
def test_text_family_trains_exports_and_serves(family: str, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / f"{family}.json"
    config.write_text(json.dumps(_config(family, tmp_path)), encoding="utf-8")
    run, export, index = tmp_path / "run", tmp_path / "export", tmp_path / "index"
    assert compir_main(["train", "--data", str(synth_data), "--out", str(run), "--model", str(config), "--epochs", "1",
                        "--steps-per-epoch", "2", "--batch-size", "4", "--amp", "off", "--val-queries", "8", "--workers", "0",
                        "--no-progress"]) == 0
    assert compir_main(["export", "onnx", str(run / "best.pt"), "--out", str(export), "--variants", "fp32",
                        "--calibration-data", str(synth_data), "--calibration-count", "4"]) == 0
    printed = capsys.readouterr()  # the HF text tower's graph parses on TensorRT (compir's parser lint)
    assert "warning: TensorRT lint" not in printed.err and "TensorRT lint: fp32 parse on TensorRT 10.3, 10.15" in printed.out
    manifest = load_manifest(export)
    assert max(manifest.variant("fp32").parity.values()) <= 1e-4
    assert manifest.tokenizer.kind == "hf" and (export / "tokenizer.json").is_file()

    # The runtime's tokenizer (no torch) gives the ids the model was trained on.
    from compir.train.checkpoint import load_checkpoint

    model = load_checkpoint(run / "best.pt").model
    texts = ["make it RED & bigger!", "", "remove the cube " * 20, "東京 café"]
    encoder = Encoder.from_export(export, providers=["cpu"])
    np.testing.assert_array_equal(encoder.tokenize(texts), model.tokenizer(texts).numpy())
    # Bidirectional / fixed-position pooling: the text graph keeps its context length, and ids cut
    # after the longest text (an older caller) are padded back to it: the same outputs.
    assert not model.text_length_cuttable and encoder.text_length == manifest.tokenizer.context_length
    assert manifest.graph("text_encoder").input("input_ids").shape == ("batch", manifest.tokenizer.context_length)
    ids = encoder.tokenize(texts[:2])
    short = fit_length(ids, length=None, pad_id=manifest.tokenizer.pad_id)
    assert short.shape[1] < ids.shape[1]
    np.testing.assert_array_equal(encoder.encode_input_ids(short).text_embeds, encoder.encode_input_ids(ids).text_embeds)

    assert compir_main(["index", "build", str(export), "--images", str(synth_data / "images"), "--out", str(index), "--quiet"]) == 0
    capsys.readouterr()
    item = sorted(p.stem for p in (synth_data / "images").glob("*.png"))[0]
    assert compir_main(["search", str(export), str(index), "--reference-id", item, "--text", "make it red", "--json", "-k", "3"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits["hits"] if isinstance(hits, dict) else hits) == 3


@pytest.mark.parametrize("family", ["roberta", "mt5", "nllb"])
def test_other_hf_tower_architectures_export_with_parity(family: str, tmp_path: Path) -> None:
    import torch

    from compir.export.to_onnx import export_onnx
    from compir.train.checkpoint import save_checkpoint
    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    config = tmp_path / f"{family}.json"
    config.write_text(json.dumps(_config(family, tmp_path)), encoding="utf-8")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", model=CIRModel(resolve_model_config(config)), metrics={}, step=0, epoch=0)
    manifest = export_onnx(tmp_path / "model.pt", out_dir=tmp_path / "export", calibration_count=4)
    assert max(manifest.variant("fp32").parity.values()) <= 1e-4
    from compir.export.trt.lint_export import blocking, lint_export

    assert blocking(lint_export(tmp_path / "export", manifest=manifest)) == []  # TensorRT's parser takes every node


def test_a_text_tower_that_cannot_be_found_is_one_line(tmp_path: Path) -> None:
    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    config = _config("xlm-roberta", tmp_path)
    config["open_clip"]["text_cfg"]["hf_model_name"] = str(tmp_path / "no-model")
    (tmp_path / "bad-tower.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(InputError, match="Hugging Face text tower .*no-model': no such folder"):
        CIRModel(resolve_model_config(tmp_path / "bad-tower.json"))
    config = _config("siglip2", tmp_path)
    config["open_clip"]["text_cfg"]["hf_tokenizer_name"] = str(tmp_path / "no-tokenizer")
    (tmp_path / "bad-tokenizer.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(InputError, match="cannot load Hugging Face tokenizer .*no-tokenizer': no such folder"):
        CIRModel(resolve_model_config(tmp_path / "bad-tokenizer.json"))
    config["open_clip"]["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize", "language": "fr"}
    (tmp_path / "bad-option.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(InputError, match=r"tokenizer_kwargs \['language'\] are not supported"):
        CIRModel(resolve_model_config(tmp_path / "bad-option.json"))
