"""TG-CIR's per-dataset recipes (model configs on ViT-B/16): their settings, and one training step at real size."""

from __future__ import annotations

import math

import pytest
import torch

from compir.errors import InputError
from compir.train.cli import build_parser, given_flags, with_recipe_settings
from compir.train.config import resolve_model_config
from compir.train.options import TrainOptions

# The authors' settings (METHODS.md, TG-CIR): P global tokens, Q local tokens, tau, loss weights.
RECIPES = {
    "tgcir-fashioniq": (4, 8, 0.1, {"teacher": 1.0, "mask_constraint": 1.0, "ortho": 0.1, "distill": 10.0, "matching": 0.5}),
    "tgcir-cirr": (4, 8, 0.05, {"teacher": 1.0, "mask_constraint": 1.0, "ortho": 0.1, "distill": 1.0, "matching": 0.1}),
    "tgcir-shoes": (3, 6, 0.1, {"teacher": 1.0, "mask_constraint": 1.0, "ortho": 0.05, "distill": 5.0, "matching": 0.5}),
}
OPTIMIZER = {"lr": 1e-4, "backbone_lr_scale": 0.1, "weight_decay": 0.01, "batch_size": 64}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_resolves_to_the_papers_settings(name):
    config = resolve_model_config(name)
    global_tokens, local_tokens, tau, weights = RECIPES[name]
    assert config.clip_name == "ViT-B-16" and config.embed_dim == 512 and config.image_size == 224
    assert config.head == "tgcir"
    options = config.head_options
    assert (options["global_tokens"], options["local_tokens"], options["matching_temperature"]) == (global_tokens, local_tokens, tau)
    assert options["matching_labels"] == "target" and options["image_tokens"] == "pre_ln_cls"
    assert options["shared_extractors"] and options["detach_teacher_inputs"] and options["teacher_local_weight"]
    assert config.loss_weights == {"composed": 1.0, "caption": 0.0, **weights}
    assert config.train == OPTIMIZER


def test_compir_train_takes_the_recipes_optimizer_settings_unless_a_flag_gives_them():
    parser = build_parser()
    argv = ["--data", "d", "--model", "tgcir-cirr", "--lr", "3e-4"]
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    assert given == {"data", "model", "lr"}
    options = with_recipe_settings(TrainOptions(**vars(args)), given)
    assert (options.lr, options.backbone_lr_scale, options.weight_decay, options.batch_size) == (3e-4, 0.1, 0.01, 64)
    assert isinstance(options.batch_size, int)
    # a model config without a "train" entry leaves compir train's own defaults
    plain = TrainOptions(**vars(parser.parse_args(["--data", "d", "--model", "micro"])))
    assert with_recipe_settings(plain, {"data", "model"}) == plain


def test_unknown_train_settings_are_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"open_clip": "ViT-B-16", "head": {"name": "tgcir"}, "loss_weights": {"composed": 1.0}, "train": {"momentum": 0.9}}')
    with pytest.raises(InputError, match="unknown setting"):
        resolve_model_config(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_a_step_on_a_real_size_vit_b16(name):
    from compir.train.model import CIRModel
    from compir.train.optim import build_optimizer
    from compir.train.text import tokenize

    torch.manual_seed(0)
    config = resolve_model_config(name)
    model = CIRModel(config)  # random ViT-B/16 weights (no download)
    settings = config.train
    optimizer = build_optimizer(model, lr=settings["lr"], weight_decay=settings["weight_decay"],
                                backbone_lr_scale=settings["backbone_lr_scale"])
    assert sorted({round(group["lr"], 12) for group in optimizer.param_groups}) == [1e-5, 1e-4]
    pixels = torch.randn(4, 3, 224, 224)
    ids = tokenize(["is red and longer", "has no sleeves"], context_length=model.context_length)
    watched = ("local_weight", "visual.transformer.resblocks.0.attn")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if any(part in n for part in watched)}
    losses = model(pixels[:2], ids, pixels[2:])
    loss = sum(config.loss_weights.get(term, 1.0) * value for term, value in losses.items())
    assert math.isfinite(float(loss.detach()))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}
    assert "head.local_weight" in changed and any("resblocks.0.attn" in n for n in changed)
    tokens = model.head.tokens
    with torch.no_grad():
        _, features, _ = model.encode_image(pixels[:1])
    assert features.shape == (1, tokens, 512)
