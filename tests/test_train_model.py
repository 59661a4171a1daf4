"""CIRModel, its configs, heads, tokenizer and transforms (small models, real open_clip)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from compir.errors import InputError
from compir.train.config import ModelConfig, list_model_configs, resolve_model_config
from compir.train.heads import build_head, head_names
from compir.train.model import CIRModel
from compir.train.text import TextTokenizer, tokenize, vocab_path
from compir.train.transforms import eval_transform, pixels_to_tensor


@pytest.fixture(scope="module")
def micro_model() -> CIRModel:
    torch.manual_seed(0)
    return CIRModel(resolve_model_config("micro")).eval()


def test_builtin_configs_resolve_and_tiny_is_the_documented_size():
    assert {"tiny", "micro"} <= set(list_model_configs())
    tiny = resolve_model_config("tiny")
    assert (tiny.image_size, tiny.context_length, tiny.embed_dim) == (32, 32, 128)  # 32 px input: the 64 px renders downsampled
    assert tiny.clip_cfg["vision_cfg"]["patch_size"] == 8 and tiny.head == "combiner"
    assert ModelConfig.from_dict(tiny.to_dict()) == tiny


def test_open_clip_names_and_json_files_resolve(tmp_path):
    vit = resolve_model_config("ViT-B-32")
    assert vit.clip_name == "ViT-B-32" and vit.embed_dim == 512 and vit.head == "combiner"
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"open_clip": resolve_model_config("micro").clip_cfg, "head": {"name": "combiner", "dropout": 0.0}}))
    config = resolve_model_config(custom)
    assert config.name == "mine" and config.head_options == {"dropout": 0.0}


@pytest.mark.parametrize("spec", ["no-such-model", "/nonexistent/config.json"])
def test_unknown_model_is_a_clear_input_error(spec):
    with pytest.raises(InputError, match="model"):
        resolve_model_config(spec)


def test_encoders_return_pinned_shapes_and_unit_vectors(micro_model):
    config = micro_model.config
    pixels = torch.randn(3, 3, config.image_size, config.image_size)
    ids = tokenize(["a red cube", "remove the ball", "x"], context_length=config.context_length)
    with torch.no_grad():
        image_embeds, image_features, patches = micro_model.encode_image(pixels)
        text_embeds, text_features, tokens = micro_model.encode_text(ids)
        query = micro_model.compose(image_features, text_features)
        fused = micro_model.encode_query(pixels, ids)
    width = config.clip_cfg["vision_cfg"]["width"]
    patch_count = (config.image_size // config.clip_cfg["vision_cfg"]["patch_size"]) ** 2
    assert image_embeds.shape == (3, config.embed_dim) and patches.shape == (3, patch_count, width)
    assert text_embeds.shape == (3, config.embed_dim) and tokens.shape == (3, config.context_length, config.clip_cfg["text_cfg"]["width"])
    for vectors in (image_embeds, text_embeds, query):
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(query, fused, atol=1e-6)


def test_compose_uses_both_inputs(micro_model):
    pixels = torch.randn(2, 3, 32, 32)
    ids = tokenize(["make it blue", "add a cone"], context_length=16)
    with torch.no_grad():
        _, image_features, _ = micro_model.encode_image(pixels)
        _, text_features, _ = micro_model.encode_text(ids)
        base = micro_model.compose(image_features, text_features)
        swapped_text = micro_model.compose(image_features, text_features.flip(0))
        swapped_image = micro_model.compose(image_features.flip(0), text_features)
    assert not torch.allclose(base, swapped_text, atol=1e-4)
    assert not torch.allclose(base, swapped_image, atol=1e-4)


def test_freezing_a_tower_stops_its_gradients():
    model = CIRModel(resolve_model_config("micro"))
    model.freeze_towers(image=True)
    assert not any(p.requires_grad for p in model.backbone.visual.parameters())
    assert all(p.requires_grad for p in model.backbone.text.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_head_registry_builds_combiner_and_rejects_unknowns():
    assert "combiner" in head_names()
    head = build_head("combiner", embed_dim=8, image_width=4, text_width=4, options={"projection_dim": 16})
    losses = head.training_losses(
        reference=torch.randn(4, 8), text=torch.randn(4, 8), target=torch.randn(4, 8), logit_scale=torch.tensor(10.0)
    )
    assert set(losses) == set(head.loss_terms) and losses["composed"].ndim == 0
    with pytest.raises(InputError, match="unknown composition head"):
        build_head("nope", embed_dim=8, image_width=4, text_width=4, options={})
    with pytest.raises(InputError, match="bad options"):
        build_head("combiner", embed_dim=8, image_width=4, text_width=4, options={"colour": 1})


def test_tokenizer_matches_its_recorded_settings():
    settings = TextTokenizer(context_length=8).settings()
    ids = tokenize(["a very long modification text that overflows the context"], context_length=8)
    assert ids.shape == (1, 8) and ids.dtype == torch.int64
    assert ids[0, 0] == settings["sot_id"] and ids[0, -1] == settings["eot_id"]
    short = tokenize(["red"], context_length=8)[0]
    assert short[2] == settings["eot_id"] and (short[3:] == settings["pad_id"]).all()
    assert vocab_path().is_file() and vocab_path().name.endswith(".txt.gz")


def test_fast_pixel_path_equals_open_clip_eval_transform(micro_model):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    spec = micro_model.preprocess
    reference = torch.stack([eval_transform(spec)(image) for image in images])
    assert torch.allclose(pixels_to_tensor(images, spec), reference, atol=1e-5)


def test_pretrained_weights_load_from_a_local_open_clip_file(tmp_path, micro_model):
    weights = tmp_path / "open_clip_weights.pt"
    torch.save(micro_model.backbone.state_dict(), weights)  # what open_clip checkpoints hold
    loaded = CIRModel(resolve_model_config("micro"), pretrained=str(weights))
    for (name, expected), actual in zip(micro_model.backbone.state_dict().items(), loaded.backbone.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), name
    with pytest.raises(InputError, match="pretrained"):
        CIRModel(resolve_model_config("micro"), pretrained=str(tmp_path / "missing.pt"))


def _config_file(tmp_path, name: str, **changes) -> str:
    record = {"open_clip": resolve_model_config("micro").clip_cfg, "head": {"name": "combiner"}, **changes}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(record))
    return str(path)


def test_loss_weights_name_only_terms_the_head_trains(tmp_path):
    with pytest.raises(InputError, match=r"unknown term\(s\) \['compsoed'\]; head 'combiner' trains \['composed', 'caption'\]"):
        resolve_model_config(_config_file(tmp_path, "typo", loss_weights={"composed": 1.0, "compsoed": 0.5}))
    with pytest.raises(InputError, match=r"\['teacher'\]"):  # a TG-CIR term on the combiner head
        resolve_model_config(_config_file(tmp_path, "other", loss_weights={"composed": 1.0, "teacher": 0.5}))
    tgcir = {"name": "tgcir", **resolve_model_config("micro-tgcir").head_options}
    config = resolve_model_config(_config_file(tmp_path, "ok", head=tgcir, loss_weights={"composed": 1.0, "teacher": 0.5, "caption": 0.1}))
    assert set(config.loss_weights) == {"composed", "teacher", "caption"}
    for name in list_model_configs():
        resolve_model_config(name)  # every built-in config passes


def test_preprocess_mean_and_std_need_three_channels(tmp_path):
    with pytest.raises(InputError, match="bad_mean.json: preprocess mean: expected 3 values"):
        resolve_model_config(_config_file(tmp_path, "bad_mean", preprocess={"mean": [0.5, 0.5, 0.5, 0.5]}))
