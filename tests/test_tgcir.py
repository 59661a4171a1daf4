"""TG-CIR head: shapes, each loss term reaches the parameters it should, and it exports with parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compir.train.config import resolve_model_config
from compir.train.heads import head_names
from compir.train.heads.tgcir import TgcirHead, orthogonality_loss
from compir.train.model import CIRModel
from compir.train.text import tokenize

TEXTS = ["add a red cube", "remove the small circle", "make the triangle blue", "move the square to the top left"]


@pytest.fixture(scope="module")
def model() -> CIRModel:
    torch.manual_seed(0)
    return CIRModel(resolve_model_config("micro-tgcir"))


def _batch(model: CIRModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = model.config.image_size
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(2 * len(TEXTS), 3, size, size, generator=generator)
    return pixels[: len(TEXTS)], tokenize(TEXTS, context_length=model.context_length), pixels[len(TEXTS) :]


def test_tgcir_is_registered_and_features_are_token_sets(model):
    assert "tgcir" in head_names()
    head = model.head
    assert isinstance(head, TgcirHead) and head.tokens == 5
    reference, ids, _ = _batch(model)
    with torch.no_grad():
        image_embeds, image_features, _ = model.encode_image(reference)
        text_embeds, text_features, _ = model.encode_text(ids)
        query = model.compose(image_features, text_features)
    assert image_features.shape == (4, 5, 64) and text_features.shape == (4, 5, 64)
    for vectors in (image_embeds, text_embeds, query):
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(4), atol=1e-5)
    # The gallery vector is the normalised mean of the attribute tokens.
    assert torch.allclose(image_embeds, torch.nn.functional.normalize(image_features.mean(1), dim=-1), atol=1e-6)


def test_padding_words_do_not_change_text_features(model):
    ids = tokenize(["add a red cube"], context_length=model.context_length)
    with torch.no_grad():
        pooled, tokens = model.backbone.text(ids)
        base = model.head.text_features(pooled, tokens, ids == 0)
        noisy = tokens.clone()
        noisy[:, 8:] += 5.0  # positions past EOT are padding: whatever they hold must not matter
        changed = model.head.text_features(pooled, noisy, ids == 0)
    assert torch.allclose(base, changed, atol=1e-5)


def _grad_norms(model: CIRModel, term: str) -> dict[str, float]:
    """Gradient norm per head sub-module when only ``term`` is back-propagated."""
    model.zero_grad(set_to_none=True)
    reference, ids, target = _batch(model)
    losses = model(reference, ids, target)
    losses[term].backward()
    norms: dict[str, float] = {}
    for name, param in model.head.named_parameters():
        part = name.split(".")[0]
        grad = 0.0 if param.grad is None else float(param.grad.norm())
        norms[part] = norms.get(part, 0.0) + grad
    return norms


@pytest.mark.parametrize(
    ("term", "reaches", "spares"),
    [
        ("composed", {"student_gate", "image_local", "text_local", "shared_local", "shared_global"},
         {"teacher_remain", "teacher_replace", "local_weight"}),
        # The teacher's reference and text inputs are detached (the authors' form): only the target's
        # features (image side) and the teacher's own parameters learn from it.
        ("teacher", {"teacher_remain", "teacher_replace", "local_weight", "image_local", "shared_local"},
         {"student_gate", "text_local"}),
        ("distill", {"student_gate"}, {"teacher_remain", "teacher_replace"}),
        ("mask_constraint", {"teacher_remain", "teacher_replace"}, {"student_gate", "text_local"}),
        ("ortho", {"image_local", "text_local", "shared_local", "shared_global"}, {"student_gate", "teacher_remain"}),
        # The soft labels (target-to-target similarity) are detached: only the student side learns.
        ("matching", {"student_gate", "image_local", "text_local"}, {"teacher_remain", "teacher_replace", "local_weight"}),
    ],
)
def test_each_loss_term_moves_the_parameters_it_should(model, term, reaches, spares):
    norms = _grad_norms(model, term)
    for part in reaches:
        assert norms[part] > 0, f"{term} does not reach {part}"
    for part in spares:
        assert norms[part] == 0, f"{term} should not train {part}"


def test_orthogonality_loss_is_zero_for_orthonormal_tokens_only():
    eye = torch.eye(4).unsqueeze(0)  # 4 orthonormal tokens in 4-D
    assert float(orthogonality_loss(eye)) == pytest.approx(0.0, abs=1e-7)
    same = torch.ones(1, 4, 4)
    assert float(orthogonality_loss(same)) > 0.5


def test_every_weighted_term_is_a_head_term(model):
    terms = set(model.head.loss_terms) | {"caption"}
    assert set(model.config.loss_weights) <= terms
    assert set(resolve_model_config("tiny-tgcir").loss_weights) <= terms


def test_tgcir_checkpoint_exports_with_fp32_parity(model, tmp_path):
    from compir.export.parity import open_session, run_session
    from compir.export.to_onnx import export_onnx
    from compir.train.checkpoint import save_checkpoint

    checkpoint = tmp_path / "tgcir.pt"
    save_checkpoint(checkpoint, model=model.eval(), metrics={}, step=0, epoch=0)
    manifest = export_onnx(checkpoint, out_dir=tmp_path / "export", calibration_count=4, fused=True)
    fp32 = manifest.variant("fp32")
    assert manifest.head == "tgcir" and max(fp32.parity.values()) <= 1e-4
    assert fp32.graph("image_encoder").output("image_features").shape == ("batch", 5, 64)
    reference, ids, _ = _batch(model)
    session = open_session(tmp_path / "export" / fp32.graph("query_encoder").file)
    got = run_session(session, {"pixel_values": reference.numpy(), "input_ids": ids.numpy()})["query_embeds"]
    with torch.no_grad():
        expected = model.encode_query(reference, ids).numpy()
    assert np.max(np.abs(got - expected)) <= 1e-4


def _head(**options: object) -> TgcirHead:
    torch.manual_seed(0)
    return TgcirHead(embed_dim=8, image_width=8, text_width=8, global_tokens=2, local_tokens=2, hidden_dim=8, **options)


def _unit_tokens(seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_matching_soft_labels_are_target_to_target_similarity():
    head = _head()
    reference, text, target = _unit_tokens(1), _unit_tokens(2), _unit_tokens(3)
    with torch.no_grad():
        head.local_weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        got = head.training_losses(reference=reference, text=text, target=target, logit_scale=torch.tensor(10.0))["matching"]
        # The authors' labels: the slot-weighted target tokens, flattened, against every batch target.
        flat = torch.nn.functional.normalize((target * head.local_weight.view(1, -1, 1)).flatten(1), dim=-1)
        labels = torch.softmax(flat @ flat.T / 0.1, dim=-1)
        query = head.compose(reference, text)
        gallery = head.gallery_embeds(target)
        expected = torch.nn.functional.kl_div(torch.log_softmax(query @ gallery.T / 0.1, dim=-1), labels, reduction="batchmean")
        # compir's earlier labels (the teacher query's similarities) give another value.
        teacher_form = _head(matching_labels="teacher")
        teacher_form.load_state_dict(head.state_dict())
        other = teacher_form.training_losses(reference=reference, text=text, target=target, logit_scale=torch.tensor(10.0))
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(other["matching"]) - float(got)) > 1e-4


def test_global_masks_are_shared_block_initialised_and_non_negative():
    head = _head()
    assert head.shared_global is not None and head.image_global is None and head.text_global is None
    masks = head.shared_global.masks.detach()
    assert torch.equal(masks[0, :4], torch.ones(4)) and torch.allclose(masks[0, 4:], torch.full((4,), 0.1))
    assert torch.equal(masks[1, 4:], torch.ones(4))
    with torch.no_grad():
        head.shared_global.masks[0, 0] = -3.0  # a negative mask entry is cut to 0 (ReLU)
        pooled = torch.ones(1, 8)
        assert float(head.shared_global(pooled)[0, 0, 0]) == 0.0
    separate = _head(shared_extractors=False)
    assert separate.shared_global is None and separate.image_global is not None and separate.text_global is not None


def test_image_tokens_before_the_final_layernorm_with_the_class_token(model):
    assert model.head.wants_raw_image_tokens
    reference, _, _ = _batch(model)
    seen: list[torch.Tensor] = []
    hook = model.head.image_local.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            _, _, patches = model.encode_image(reference)
            pooled, expected_patches = model.backbone.visual(reference)
    finally:
        hook.remove()
    grid = (model.config.image_size // 8) ** 2
    assert seen[0].shape == (4, 1 + grid, 64)  # class token + patches, as the head reads them
    # Not LayerNorm'd: open_clip's patch outputs are ln_post of these tokens (the third output is unchanged).
    assert torch.allclose(model.backbone.visual.ln_post(seen[0][:, 1:]), expected_patches, atol=1e-5)
    assert not torch.allclose(seen[0][:, 1:], expected_patches, atol=1e-3)
    assert torch.equal(patches, expected_patches)


def test_unknown_option_values_are_refused():
    with pytest.raises(TypeError, match="matching_labels"):
        _head(matching_labels="student")
    with pytest.raises(TypeError, match="image_tokens"):
        _head(image_tokens="cls")
