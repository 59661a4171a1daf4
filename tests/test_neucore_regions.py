"""NEUCORE beyond CLIP BPE and TG-CIR: image regions for a head without local tokens (the combiner)
cached in the index and re-ranked through it with torch parity, and a model with a Hugging Face
(SigLIP2-style) tokenizer whose concepts map to tokens by character offsets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compir.errors import ContractError
from compir.manifest import IMAGE_ENCODER, RERANKER
from compir.train.config import resolve_model_config
from compir.train.model import CIRModel

GRID, WEIGHT = 2, 0.5


def _checkpoint(root: Path, config: str) -> Path:
    from compir.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = root / "best.pt"
    save_checkpoint(path, model=CIRModel(resolve_model_config(config)), metrics={}, step=0, epoch=0)
    return path


@pytest.fixture(scope="module")
def regions(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from compir.export.to_onnx import export_onnx
    from compir.runtime.build import build_index
    from compir.runtime.encoder import Encoder
    from compir.train.neucore.train import train_neucore

    root = tmp_path_factory.mktemp("regions")
    checkpoint = _checkpoint(root, "micro")  # the combiner head: one vector per image
    # A fixed weight: a random model's validation figures would (rightly) switch NEUCORE off.
    train_neucore(checkpoint, data=synth_data, steps=3, batch_size=6, val_queries=12, weight=WEIGHT, regions=GRID, progress=False)
    export = root / "export"
    export_onnx(checkpoint, out_dir=export, calibration_count=4)  # picks up the sidecar and its regions
    images = root / "images"
    images.mkdir()
    for path in sorted((synth_data / "images").glob("*.png"))[:24]:
        shutil.copy(path, images / path.name)
    build_index(Encoder.from_export(export, providers=["cpu"]), images=images, out=root / "index", workers=1, progress=False)
    return {"checkpoint": checkpoint, "export": export, "index": root / "index", "images": images}


def test_combiner_regions_leave_retrieval_unchanged(synth_data):
    torch.manual_seed(0)
    model = CIRModel(resolve_model_config("micro")).eval()
    pixels, ids = torch.randn(3, 3, 32, 32), model.tokenizer(["add a red cube", "remove it", "make the circle blue"])
    with torch.no_grad():
        embeds, vectors, _ = model.encode_image(pixels)
        query = model.encode_query(pixels, ids)
        assert model.use_image_regions(GRID) == GRID
        with_regions, features, _ = model.encode_image(pixels)
        assert torch.allclose(model.encode_query(pixels, ids), query, atol=1e-6) and torch.equal(with_regions, embeds)
    assert features.shape == (3, 1 + GRID * GRID, model.embed_dim) and torch.equal(features[:, 0], vectors)
    assert torch.allclose(features[:, 1:].norm(dim=-1), torch.ones(3, GRID * GRID), atol=1e-5)
    assert not torch.allclose(features[:, 1], features[:, 2])  # distinct regions of the image
    tgcir = CIRModel(resolve_model_config("micro-tgcir"))
    assert tgcir.use_image_regions(GRID) == 0  # TG-CIR attends over its own local tokens


def test_the_index_caches_the_regions_and_the_runtime_reranks_them_as_torch_does(regions):
    from compir.manifest import load_manifest
    from compir.train.checkpoint import load_checkpoint
    from compir.train.neucore.stage2 import load_sidecar, sidecar_path
    from tests.test_tgcir_stage2 import served_and_torch_neucore

    fp32 = load_manifest(regions["export"]).variant("fp32")
    regions_shape = (1 + GRID * GRID, 64)
    assert fp32.graph(IMAGE_ENCODER).output("image_features").shape[1:] == regions_shape
    assert fp32.graph(RERANKER).input("candidate_features").shape[1:] == regions_shape and fp32.parity[RERANKER] <= 1e-4
    from compir.export.trt.lint_export import blocking, lint_export

    linted = lint_export(regions["export"], variants=["fp32"])  # NEUCORE's Loop graph and the region encoder parse on TensorRT
    assert RERANKER in linted["fp32"] and blocking(linted) == []
    assert load_sidecar(sidecar_path(regions["checkpoint"], "neucore"), kind="neucore").config["region_grid"] == GRID
    retriever, item, first, got, joint, _ = served_and_torch_neucore(regions, name="neucore")
    gallery = retriever.gallery
    assert gallery.features.shape == (24, *regions_shape)
    expected = np.array([h.score for h in first]) + WEIGHT * joint
    assert np.allclose([got[h.item_id] for h in first], expected, atol=1e-3)
    # The cached regions are what the model computes for the image.
    loaded = load_checkpoint(regions["checkpoint"])
    loaded.model.use_image_regions(GRID)
    with torch.no_grad():
        _, features, _ = loaded.model.encode_image(torch.from_numpy(_pixels(loaded, Path(gallery.image_path(item)))))
    assert np.allclose(features[0].numpy(), gallery.features[gallery.row(item)], atol=1e-4)


def _pixels(loaded, path: Path) -> np.ndarray:
    from compir.images import load_image
    from compir.train.transforms import eval_transform

    return eval_transform(loaded.preprocess)(load_image(path, name=path.name))[None].numpy()


def test_an_export_without_the_regions_is_refused_with_what_to_rebuild(regions, tmp_path):
    from compir.export.rerankers import add_rerankers
    from compir.export.to_onnx import export_onnx

    bare = tmp_path / "bare.pt"
    shutil.copy(regions["checkpoint"], bare)  # same checkpoint, no sidecar beside it: exported without regions
    export_onnx(bare, out_dir=tmp_path / "export", calibration_count=4)
    sidecar = regions["checkpoint"].with_name("best.neucore.pt")
    with pytest.raises(ContractError, match="export the checkpoint again with its NEUCORE sidecar"):
        add_rerankers(tmp_path / "export", checkpoint=bare, neucore=sidecar)


def test_neucore_trains_and_exports_on_a_siglip_style_hf_tokenizer(synth_data, tmp_path):
    pytest.importorskip("transformers", reason="HF tokenizers need transformers")
    from compir.export.to_onnx import export_onnx
    from compir.manifest import load_manifest
    from compir.runtime.encoder import Encoder
    from compir.runtime.rerankers.neucore import NeucoreStage
    from compir.train.checkpoint import load_checkpoint
    from compir.train.neucore.model import NeucoreConfig, NeucoreScorer
    from compir.train.neucore.train import concept_input_ids, train_neucore
    from tests.test_text_families import _config

    config = tmp_path / "siglip2.json"
    config.write_text(json.dumps(_config("siglip2", tmp_path)), encoding="utf-8")
    checkpoint = _checkpoint(tmp_path, str(config))
    result = train_neucore(checkpoint, data=synth_data, steps=2, batch_size=4, val_queries=8, weight=WEIGHT, progress=False)
    export = tmp_path / "export"
    export_onnx(checkpoint, out_dir=export, calibration_count=4)
    manifest = load_manifest(export)
    assert manifest.tokenizer.kind == "hf" and manifest.variant("fp32").parity[RERANKER] <= 1e-4

    # Concepts by character offsets: the content words' tokens, the same in training and in the runtime.
    model = load_checkpoint(checkpoint).model
    scorer = NeucoreScorer(NeucoreConfig(**torch.load(result.path, weights_only=True)["config"]))
    encoder = Encoder.from_export(export, providers=["cpu"])
    stage = NeucoreStage.from_export(encoder, export, manifest, "fp32", {"weight": WEIGHT})
    texts = ["Make it a RED circle, and remove the square!", "add a green triangle to the left", "make it so"]
    trained = concept_input_ids(model.tokenizer, scorer, texts).numpy()
    served = np.stack([stage.concepts(row, text) for row, text in zip(encoder.tokenize(texts), texts, strict=True)])
    np.testing.assert_array_equal(trained, served)
    cleaned, offsets = model.tokenizer.offsets(texts[0])
    kept = [cleaned[a:b].strip() for (a, b), token in zip(offsets, trained[0], strict=True) if token != 0]
    # The content words' tokens (a token across two words, as this BPE's "the square", counts for its content word).
    joined = "".join(kept)
    assert all(word in joined for word in ("red", "circle", "square")) and not any(word in joined for word in ("make", "remove"))
    assert (trained[2] == model.tokenizer(texts).numpy()[2]).all()  # no content word: every id is a concept


@pytest.mark.parametrize("family", ["vit", "resnet", "timm-convnext"])
def test_every_tower_family_gives_regions_in_the_pooled_space(family: str, tmp_path: Path) -> None:
    """Regions are the tower's own map into its pooled space, applied per region: one region (grid 1) is
    a ViT's projected mean patch, a ResNet's attention-pool value path of the mean cell, a timm head of the mean token."""
    from tests.test_backbone_families import _COMBINER, FAMILIES

    arch, _, (count, _) = FAMILIES[family]
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps({"open_clip": arch, "head": _COMBINER, "loss_weights": {"composed": 1.0}}))
    torch.manual_seed(0)
    model = CIRModel(resolve_model_config(path)).eval()
    size = model.config.image_size
    pixels = torch.randn(2, 3, size, size)
    assert model.use_image_regions(2) == 2
    with torch.no_grad():
        _, features, patches = model.encode_image(pixels)
        model.use_image_regions(1)
        _, single, _ = model.encode_image(pixels)
    assert features.shape == (2, 5, 32) and patches.shape[1] == count and torch.isfinite(features).all()
    visual = model.backbone.visual
    mean = patches.mean(dim=1)
    if family == "vit":
        expected = mean @ visual.proj
    elif family == "resnet":
        expected = visual.attnpool.c_proj(visual.attnpool.v_proj(mean))
    else:
        expected = visual.head(mean)
    assert torch.allclose(single[:, 1], torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)


def test_a_neucore_that_did_not_help_is_left_out_of_the_export_with_its_regions(synth_data, tmp_path):
    from compir.export.to_onnx import export_onnx
    from compir.manifest import load_manifest
    from compir.runtime.encoder import Encoder
    from compir.runtime.rerankers import load_reranker
    from compir.runtime.rerankers.settings import reranker_settings
    from compir.train.neucore.train import train_neucore

    checkpoint = _checkpoint(tmp_path, "micro")
    train_neucore(checkpoint, data=synth_data, steps=1, batch_size=4, val_queries=8, weight=0.0, regions=GRID, progress=False)
    export = tmp_path / "export"
    export_onnx(checkpoint, out_dir=export, calibration_count=4)
    manifest = load_manifest(export)
    fp32 = manifest.variant("fp32")
    assert RERANKER not in fp32.graphs  # the runtime would skip it: no graph, and no regions for every index item
    assert fp32.graph(IMAGE_ENCODER).output("image_features").shape[1:] == (64,)
    assert reranker_settings(export, manifest)["neucore"] == {"weight": 0.0, "left_out": "validated weight 0"}
    assert load_reranker(Encoder.from_export(export, providers=["cpu"])) is None
    # A tool that chooses the weights again (the ablation) keeps it, regions and all; the runtime still skips it.
    kept = tmp_path / "kept"
    export_onnx(checkpoint, out_dir=kept, calibration_count=4, keep_unapplied=True)
    kept_fp32 = load_manifest(kept).variant("fp32")
    assert RERANKER in kept_fp32.graphs and kept_fp32.graph(IMAGE_ENCODER).output("image_features").shape[1:] == (1 + GRID * GRID, 64)
    assert load_reranker(Encoder.from_export(kept, providers=["cpu"])) is None
