"""Zero-shot (Pic2Word) export: the token mapper and prompt encoder graphs, their parity and variants, the TensorRT
parser lint and profiles, the manifest's composition record and its schema (older runtimes refuse it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compir.cli import main
from compir.contracts import MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_SCHEMA, MANIFEST_SCHEMA_COMPOSER, read_contract
from compir.engines import ShapeRange, compute_profile, token_range
from compir.errors import ContractError
from compir.export.trt.lint_export import blocking, lint_export
from compir.manifest import load_manifest
from compir.prompts import DEFAULT_TEMPLATE
from compir.runtime.encoder import Encoder
from compir.train.checkpoint import load_checkpoint
from tests.fixtures.zero_shot import ZS_VARIANTS


def test_the_export_has_a_token_mapper_and_a_prompt_encoder_and_no_composer(zs_export: Path) -> None:
    manifest = load_manifest(zs_export)
    assert manifest.zero_shot and manifest.head == "pic2word"
    for variant in ZS_VARIANTS:
        assert sorted(manifest.variant(variant).graphs) == ["image_encoder", "prompt_encoder", "text_encoder", "token_mapper"]
    mapper, prompt = manifest.graph("token_mapper"), manifest.graph("prompt_encoder")
    width = manifest.graph("image_encoder").output("image_features").shape[1]
    assert [(t.name, t.shape) for t in mapper.inputs] == [("image_features", ("batch", width))]
    assert [(t.name, t.shape) for t in mapper.outputs] == [("pseudo_tokens", ("batch", 64))]
    assert [(t.name, t.shape) for t in prompt.inputs] == [("input_ids", ("batch", "sequence")), ("pseudo_tokens", ("batch", 64))]
    assert [(t.name, t.shape) for t in prompt.outputs] == [("query_embeds", ("batch", manifest.embed_dim))]
    # checked at export like every graph: fp32 against torch, the others against fp32
    fp32 = manifest.variant("fp32").parity
    assert set(fp32) == {"image_encoder", "text_encoder", "token_mapper", "prompt_encoder"} and max(fp32.values()) <= 1e-4
    for variant in ZS_VARIANTS[1:]:
        assert min(manifest.variant(variant).parity.values()) >= 0.99, variant


def test_the_manifest_records_the_composition_and_needs_the_new_schema(zs_export: Path, micro_export: Path) -> None:
    raw = json.loads((zs_export / MANIFEST_FILE).read_text())
    assert raw["schema_version"] == MANIFEST_SCHEMA == 2
    assert raw["composition"] == {"kind": "pic2word", "prompt_template": DEFAULT_TEMPLATE, "placeholder": "*", "placeholder_id": 265}
    learned = json.loads((micro_export / MANIFEST_FILE).read_text())
    assert learned["schema_version"] == MANIFEST_SCHEMA_COMPOSER == 1 and learned["composition"]["kind"] == "combiner"
    # A runtime that knows schema 1 only (what an older compir's load_manifest reads with): the learned
    # composer's export still loads, the zero-shot one is refused with what to do.
    read_contract(micro_export / MANIFEST_FILE, fmt=MANIFEST_FORMAT, schema_version=MANIFEST_SCHEMA_COMPOSER)
    with pytest.raises(ContractError, match=r"schema version 2 is newer than this compir understands \(1\); upgrade compir"):
        read_contract(zs_export / MANIFEST_FILE, fmt=MANIFEST_FORMAT, schema_version=MANIFEST_SCHEMA_COMPOSER)


def test_a_manifest_with_a_broken_composition_is_refused(zs_export: Path, tmp_path: Path) -> None:
    raw = json.loads((zs_export / MANIFEST_FILE).read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for change, reason in [({"prompt_template": "a photo of ,"}, "is missing"), ({"placeholder_id": -1}, "no placeholder token id")]:
        (bad / MANIFEST_FILE).write_text(json.dumps({**raw, "composition": {**raw["composition"], **change}}))
        with pytest.raises(ContractError, match=reason):
            load_manifest(bad, verify_files=False)
    del raw["variants"]["fp32"]["graphs"]["token_mapper"]
    (bad / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(ContractError, match="lacks graph"):
        load_manifest(bad, verify_files=False)


def test_the_runtime_graphs_compute_what_torch_does_on_the_prompts(zs_export: Path, zs_checkpoint: Path) -> None:
    """Parity <= 1e-4 end to end: the runtime's token mapper + prompt encoder against CIRModel.encode_prompt on the same prompts."""
    model = load_checkpoint(zs_checkpoint).model.eval()
    encoder = Encoder.from_export(zs_export, providers=["cpu"])
    texts = ["make the circle red", "remove the small blue square", "add a * sign"]
    pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    features = encoder.encode_pixels(pixels).image_features
    query = encoder.compose_texts(features, texts)
    with torch.no_grad():
        ids = model.tokenizer([DEFAULT_TEMPLATE.format(modification=t.replace("*", " ")) for t in texts])
        expected = model.encode_prompt(ids, model.map_image(torch.from_numpy(features))).numpy()
    assert float(np.abs(query - expected).max()) <= 1e-4
    assert (np.asarray(encoder.prompt_ids(texts)) == 265).sum(axis=1).tolist() == [1, 1, 1]


def test_variants_get_the_accuracy_report(zs_export: Path) -> None:
    manifest = load_manifest(zs_export)
    for variant in ZS_VARIANTS:
        accuracy = manifest.variant(variant).accuracy
        assert {"R@10", "n_queries"} <= set(accuracy) and accuracy["n_queries"] > 0, variant
        if variant != "fp32":
            assert {"recall_at_10_drop", "mean_cosine_to_fp32"} <= set(accuracy) and accuracy["mean_cosine_to_fp32"] > 0.99


def test_tensorrt_lint_passes_and_profiles_cover_the_new_inputs(zs_export: Path) -> None:
    manifest = load_manifest(zs_export)
    result = lint_export(zs_export, manifest=manifest)
    assert set(result["fp32"]) >= {"token_mapper", "prompt_encoder"} and blocking(result) == []
    tokens = token_range(manifest.tokenizer.context_length)
    mapper = compute_profile(manifest.graph("token_mapper"), min_batch=1, opt_batch=8, max_batch=64, tokens=tokens)
    features = manifest.graph("image_encoder").output("image_features").shape[1]
    assert mapper == {"image_features": ShapeRange(min=(1, features), opt=(8, features), max=(64, features))}
    prompt = compute_profile(manifest.graph("prompt_encoder"), min_batch=1, opt_batch=8, max_batch=64, tokens=tokens)
    assert prompt == {"input_ids": ShapeRange(min=(1, 1), opt=(8, 16), max=(64, 16)),
                      "pseudo_tokens": ShapeRange(min=(1, 64), opt=(8, 64), max=(64, 64))}


def test_export_cli_sets_the_template_and_refuses_a_bad_one(zs_checkpoint: Path, micro_checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for template, reason in [("a photo of , {modification}", "is missing"), ("a * and a * , {modification}", "appears 2 times")]:
        out = tmp_path / "bad"
        assert main(["export", "onnx", str(zs_checkpoint), "--out", str(out), "--variants", "fp32", "--prompt-template", template]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and reason in error and not out.exists()
    assert main(["export", "onnx", str(micro_checkpoint), "--out", str(tmp_path / "learned"), "--variants", "fp32",
                 "--prompt-template", DEFAULT_TEMPLATE]) == 2
    assert "learned composer ('combiner')" in capsys.readouterr().err
    out = tmp_path / "good"
    template = "a * that is {modification}"
    assert main(["export", "onnx", str(zs_checkpoint), "--out", str(out), "--variants", "fp32", "--calibration-count", "4",
                 "--prompt-template", template]) == 0
    printed = capsys.readouterr().out
    assert f"prompt template {template!r}, placeholder '*' (token id 265)" in printed and "TensorRT lint: fp32 parse" in printed
    assert load_manifest(out).composition_spec.prompt_template == template
    assert main(["export", "onnx", str(zs_checkpoint), "--out", str(tmp_path / "fused"), "--variants", "fp32", "--fused"]) == 2
    assert "no fused query_encoder" in capsys.readouterr().err
