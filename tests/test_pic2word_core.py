"""Pic2Word's torch core: the prompt template, the mapping net, and the text tower read with a pseudo token."""

from __future__ import annotations

import pytest
import torch

from compir.errors import InputError
from compir.prompts import DEFAULT_TEMPLATE, PromptTemplate, template_problem
from compir.train.config import DEFAULT_MODEL, configure_model, resolve_model_config
from compir.train.model import CIRModel


@pytest.fixture(scope="module")
def model() -> CIRModel:
    torch.manual_seed(0)
    return CIRModel(configure_model(resolve_model_config(DEFAULT_MODEL), head="pic2word")).eval()


@pytest.mark.parametrize(("template", "reason"), [
    ("a photo of , {modification}", "is missing"),
    ("a photo of * and * , {modification}", "appears 2 times"),
    ("a photo of *s , {modification}", "is missing"),
    ("a photo of * , {modification} {modification}", "may appear once"),
    ("a photo of * , {text}", "unknown field"),
    ("a photo of * , {modification", "unbalanced"),
    ("", "non-empty"),
])
def test_a_template_without_one_placeholder_or_with_a_bad_field_is_refused(template: str, reason: str) -> None:
    problem = template_problem(template)
    assert problem is not None and reason in problem
    with pytest.raises(InputError, match="prompt template"):
        PromptTemplate(template)


def test_a_template_fills_the_modification_and_never_a_second_placeholder() -> None:
    template = PromptTemplate(DEFAULT_TEMPLATE)
    assert template.fill("make it red") == "a photo of * , make it red"
    assert template.fill("add a * sign").count("*") == 1
    assert PromptTemplate("a photo of *").fill("ignored") == "a photo of *"


def test_the_placeholder_is_one_token_and_its_own_embedding_reads_the_plain_prompt(model: CIRModel) -> None:
    assert model.placeholder_id == 265  # "*" in CLIP's BPE, as Pic2Word's code
    ids = model.tokenizer(["a photo of * , make it red", "a photo of * , two small circles"])
    star = model.backbone.text.token_embedding.weight[265].expand(2, -1)
    with torch.no_grad():
        plain, _, _ = model.encode_text(ids)
        assert torch.allclose(model.encode_prompt(ids, star), plain, atol=1e-6)
        other = model.encode_prompt(ids, torch.randn(2, model.text_width))
    assert (other - plain).abs().max() > 1e-3  # the token really reaches the tower
    assert torch.allclose(other.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_only_the_mapping_net_trains_on_images(model: CIRModel) -> None:
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("head.") for name in trainable)
    losses = model.train().inversion_losses(torch.randn(4, 3, model.config.image_size, model.config.image_size))
    losses["inversion"].backward()
    assert model.head.fc_out.weight.grad is not None and float(losses["inversion"]) > 0
    model.eval()
