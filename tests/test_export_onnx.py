"""ONNX export: the manifest contract, torch parity (and its failure), self-contained folders,
damaged files, bad checkpoints, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compir.contracts import sha256_file
from compir.errors import ContractError
from compir.export.graphs import GraphDef, export_graph, graph_defs
from compir.export.parity import check_fp32_graph, check_fp32_parity, mean_cosine
from compir.export.samples import load_samples
from compir.export.to_onnx import export_onnx
from compir.manifest import GRAPH_ROLES, load_manifest

IO_NAMES = {
    "image_encoder": (["pixel_values"], ["image_embeds", "image_features", "patch_features"]),
    "text_encoder": (["input_ids"], ["text_embeds", "text_features", "token_features"]),
    "composer": (["image_features", "text_features"], ["query_embeds"]),
    "query_encoder": (["pixel_values", "input_ids"], ["query_embeds"]),
}


def test_manifest_describes_every_graph(tiny_export_all: Path, tiny_checkpoint: Path) -> None:
    from compir.train.checkpoint import load_checkpoint

    manifest = load_manifest(tiny_export_all)
    loaded = load_checkpoint(tiny_checkpoint)
    assert manifest.embed_dim == 64 and manifest.metric == "cos" and manifest.head == "combiner"
    assert manifest.preprocess == loaded.preprocess and manifest.opset == 17
    assert manifest.source_checkpoint_sha256 == sha256_file(tiny_checkpoint)
    tok = manifest.tokenizer
    assert (tok.context_length, tok.sot_id, tok.eot_id, tok.pad_id) == (16, 49406, 49407, 0)
    assert sha256_file(tiny_export_all / tok.vocab_file) == tok.vocab_sha256 == loaded.tokenizer["vocab_sha256"]
    fp32 = manifest.variant("fp32")
    assert set(fp32.graphs) == set(IO_NAMES) and set(GRAPH_ROLES) - set(fp32.graphs) == {"reranker", "token_mapper", "prompt_encoder"}
    for role, (inputs, outputs) in IO_NAMES.items():
        graph = fp32.graph(role)
        assert [t.name for t in graph.inputs] == inputs and [t.name for t in graph.outputs] == outputs
        assert all(t.shape[0] == "batch" for t in (*graph.inputs, *graph.outputs))
        # CLIP's causal text tower: token tensors have the dynamic sequence axis, everything else is fixed
        tokens = {"input_ids", "token_features"}
        assert all(t.shape[1] == "sequence" for t in (*graph.inputs, *graph.outputs) if t.name in tokens)
        assert all(isinstance(d, int) for t in (*graph.inputs, *graph.outputs) for d in t.shape[1 + (t.name in tokens):])
        assert 0.0 <= fp32.parity[role] <= 1e-4
    image = fp32.graph("image_encoder")
    assert image.input("pixel_values").shape == ("batch", 3, 32, 32)
    assert image.output("image_embeds").shape == ("batch", 64)
    assert image.output("patch_features").shape == ("batch", 16, 64)  # (32 / 8)^2 patches, width 64
    assert fp32.graph("text_encoder").input("input_ids").dtype == "int64"
    assert fp32.graph("text_encoder").input("input_ids").shape == ("batch", "sequence")  # the context is 16
    # The composer takes exactly what the encoders give.
    assert fp32.graph("composer").input("image_features") == image.output("image_features")
    assert fp32.graph("composer").input("text_features") == fp32.graph("text_encoder").output("text_features")


def test_manifest_shapes_are_what_onnxruntime_sees(tiny_export_all: Path) -> None:
    manifest = load_manifest(tiny_export_all)
    for variant in manifest.variants.values():
        for graph in variant.graphs.values():
            session = ort.InferenceSession(str(tiny_export_all / graph.file), providers=["CPUExecutionProvider"])
            seen = [(i.name, tuple(i.shape)) for i in session.get_inputs()] + [(o.name, tuple(o.shape)) for o in session.get_outputs()]
            assert seen == [(t.name, t.shape) for t in (*graph.inputs, *graph.outputs)], (variant.name, graph.role)


def test_copied_export_is_self_contained_and_matches_torch(
    tiny_export_all: Path, tiny_checkpoint: Path, synth_data: Path, tmp_path: Path
) -> None:
    from compir.train.checkpoint import load_checkpoint

    copy = tmp_path / "elsewhere" / "export"
    shutil.copytree(tiny_export_all, copy)
    assert str(tiny_export_all) not in (copy / "manifest.json").read_text()
    manifest = load_manifest(copy)
    loaded = load_checkpoint(tiny_checkpoint)
    samples = load_samples(
        preprocess=manifest.preprocess, tokenizer=loaded.model.tokenizer, data_dir=synth_data, count=5, seed=3
    )
    session = ort.InferenceSession(str(copy / manifest.graph("query_encoder").file), providers=["CPUExecutionProvider"])
    (onnx_query,) = session.run(["query_embeds"], {"pixel_values": samples.pixel_values, "input_ids": samples.input_ids})
    with torch.no_grad():
        torch_query = loaded.model.encode_query(torch.from_numpy(samples.pixel_values), torch.from_numpy(samples.input_ids)).numpy()
    assert onnx_query.shape == (5, 64)
    assert float(np.max(np.abs(onnx_query - torch_query))) <= 1e-4


def test_the_runtime_cuts_texts_after_the_longest_without_changing_them(tiny_export_all: Path) -> None:
    from compir.runtime.encoder import Encoder, fit_length

    texts = ["red", "make the big red cube small and blue", "add a sphere"]
    reference: dict[str, np.ndarray] = {}
    for variant in ("fp32", "fp16", "int8-dynamic", "int8-static"):
        encoder = Encoder.from_export(tiny_export_all, providers=["cpu"], variant=variant)
        assert encoder.text_length is None  # cut per batch
        ids = encoder.tokenize(texts)
        assert ids.shape == (3, 16) and fit_length(ids, length=None, pad_id=0).shape == (3, 10)  # SOT + 8 words + EOT
        text = encoder._text.run({"input_ids": ids}, ("text_embeds", "text_features"))  # the graph at the full context
        cut = encoder.encode_input_ids(ids)
        alone = encoder.encode_input_ids(ids[:1])  # one short text runs at 3 tokens: the same row
        if variant == "fp32":
            for name in ("text_embeds", "text_features"):
                assert float(np.max(np.abs(getattr(cut, name) - text[name]))) <= 1e-5, name
            assert float(np.max(np.abs(alone.text_embeds - text["text_embeds"][:1]))) <= 1e-5
        else:  # int8-dynamic scales activations over all positions, padding included: close, not exact
            assert mean_cosine(cut.text_embeds, text["text_embeds"]) >= 0.99, variant
        query = encoder.compose(encoder.encode_pixels(np.zeros((3, 3, 32, 32), np.float32)).image_features, cut.text_features)
        if variant == "fp32":
            reference = {"text": cut.text_embeds, "query": query}
        else:
            assert mean_cosine(cut.text_embeds, reference["text"]) >= 0.99 and mean_cosine(query, reference["query"]) >= 0.99, variant


def test_fit_length_cuts_or_pads_to_what_the_graph_takes() -> None:
    from compir.runtime.encoder import fit_length

    ids = np.array([[5, 7, 9, 0, 0, 0], [5, 9, 0, 0, 0, 0]])
    assert fit_length(ids, length=None, pad_id=0).tolist() == [[5, 7, 9], [5, 9, 0]]
    assert fit_length(np.zeros((2, 6), np.int64), length=None, pad_id=0).shape == (2, 1)  # never 0 tokens
    assert fit_length(ids[:, :3], length=6, pad_id=0).tolist() == ids.tolist()  # an older, fixed-length export
    assert fit_length(ids, length=4, pad_id=0).tolist() == ids[:, :4].tolist()
    with pytest.raises(ContractError, match="input_ids must be"):
        fit_length(ids[0], length=None, pad_id=0)


def test_damaged_graph_is_caught_by_the_manifest_checksum(tiny_export_all: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(tiny_export_all, copy)
    graph = copy / "fp32" / "text_encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ContractError, match="fp32 text_encoder graph.*damaged"):
        load_manifest(copy)


def test_parity_failure_names_the_graph_and_leaves_no_folder(micro_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    expected = r"parity: image_encoder output 'image_embeds' differs from torch by max abs [0-9.e-]+ at batch 1 \(tolerance 0\)"
    with pytest.raises(ContractError, match=expected):
        export_onnx(micro_checkpoint, out_dir=out, tolerance=0.0)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_graph_of_perturbed_weights_fails_parity(micro_checkpoint: Path, tmp_path: Path) -> None:
    from compir.train.checkpoint import load_checkpoint

    model = load_checkpoint(micro_checkpoint).model
    samples = load_samples(preprocess=model.preprocess, tokenizer=model.tokenizer, count=4)
    text = next(d for d in graph_defs(model) if d.role == "text_encoder")
    feeds = {"input_ids": samples.input_ids}
    path = tmp_path / "text_encoder.onnx"
    export_graph(text, feeds=feeds, path=path, opset=17)
    assert check_fp32_parity(text, path=path, feeds=feeds) <= 1e-4
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the graph now disagrees with the model
        weight = model.backbone.text.ln_final.weight
        weight.add_(0.05 * torch.randn(weight.shape, generator=generator))
    with pytest.raises(ContractError, match=r"parity: text_encoder output '\w+' differs from torch by max abs .* \(tolerance 0.0001\)"):
        check_fp32_parity(text, path=path, feeds=feeds)


class _MeanOverPads(torch.nn.Module):
    """A text tower whose pooled output reads the padding: cutting the texts changes it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 4)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.embed(input_ids)
        pooled = tokens.mean(dim=1)
        return pooled, pooled, tokens


def test_a_tower_that_reads_its_padding_fails_the_length_cut(tmp_path: Path) -> None:
    names = ("text_embeds", "text_features", "token_features")
    causal = GraphDef("text_encoder", _MeanOverPads().eval(), ("input_ids",), names, sequence_names=("input_ids", "token_features"))
    ids = np.zeros((4, 12), dtype=np.int64)
    ids[:, :3] = [[5, 6, 7], [8, 9, 10], [11, 12, 0], [13, 0, 0]]  # the longest text is 3 tokens: the cut keeps 3 of 12
    path = tmp_path / "text_encoder.onnx"
    export_graph(causal, feeds={"input_ids": ids}, path=path, opset=17)
    assert check_fp32_parity(causal, path=path, feeds={"input_ids": ids}) <= 1e-5  # the graph is right at full length
    with pytest.raises(ContractError, match=r"text_embeds' changes by [0-9.e-]+ when the texts are cut from 12 to 3 tokens"):
        check_fp32_graph(causal, path=path, feeds={"input_ids": ids}, pad_id=0)
    # Full-length ids (nothing to cut) pass, and the outputs returned are the graph's on the feeds.
    full = np.arange(48, dtype=np.int64).reshape(4, 12) % 31 + 1
    worst, outputs = check_fp32_graph(causal, path=path, feeds={"input_ids": full}, pad_id=0)
    assert worst <= 1e-5 and outputs["token_features"].shape == (4, 12, 4)
    np.testing.assert_allclose(outputs["text_embeds"], causal.module(torch.from_numpy(full))[0].detach().numpy(), atol=1e-5)


def test_bad_checkpoints_are_contract_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ContractError, match="damaged or not a compir checkpoint"):
        export_onnx(garbage, out_dir=tmp_path / "a")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "someone.else", "schema_version": 1}, foreign)
    with pytest.raises(ContractError, match="format is 'someone.else'"):
        export_onnx(foreign, out_dir=tmp_path / "b")
    with pytest.raises(ContractError, match="does not exist"):
        export_onnx(tmp_path / "missing.pt", out_dir=tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt", "garbage.pt"]


def test_bad_options_fail_before_any_work(micro_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="unknown export variant.*int4"):
        export_onnx(micro_checkpoint, out_dir=tmp_path / "x", variants=("fp32", "int4"))
    with pytest.raises(ContractError, match="opset 13 is too old"):
        export_onnx(micro_checkpoint, out_dir=tmp_path / "x", opset=13)
    with pytest.raises(ContractError, match="calibration data folder .* does not exist"):
        export_onnx(micro_checkpoint, out_dir=tmp_path / "x", calibration_data=tmp_path / "nowhere")


def test_cli_exports_refuses_to_overwrite_then_overwrites(
    micro_checkpoint: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from compir.cli import main as compir_main

    out = tmp_path / "export"
    args = ["export", "onnx", str(micro_checkpoint), "--out", str(out), "--variants", "fp32",
            "--calibration-data", str(synth_data), "--calibration-count", "4"]
    assert compir_main(args) == 0
    assert "| fp32 |" in capsys.readouterr().out
    first = json.loads((out / "manifest.json").read_text())
    assert compir_main(args) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert compir_main([*args, "--overwrite", "--opset", "18"]) == 0
    assert json.loads((out / "manifest.json").read_text())["opset"] == 18 != first["opset"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_tiny_export_fixture_is_what_the_runtime_needs(tiny_export: Path) -> None:
    manifest = load_manifest(tiny_export)
    assert sorted(manifest.variants) == ["fp32", "int8-dynamic"]
    assert max(manifest.variant("fp32").parity.values()) <= 1e-4
    assert min(manifest.variant("int8-dynamic").parity.values()) >= 0.95
