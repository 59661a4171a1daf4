"""End to end: a tiny TG-CIR checkpoint, its NEUCORE and MMRef sidecars, the export (reranker graph
with parity, MMRef matrices) and the runtime's re-rank hook serving them (rerank=True)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compir.errors import ContractError
from compir.manifest import RERANKER
from compir.train.config import resolve_model_config
from compir.train.model import CIRModel

NEUCORE_WEIGHT, MMREF_WEIGHT, TEMPERATURE = 0.5, 0.3, 0.05


@pytest.fixture(scope="module")
def stage2(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from compir.export.rerankers import add_rerankers
    from compir.export.to_onnx import export_onnx
    from compir.runtime.build import build_index
    from compir.runtime.encoder import Encoder
    from compir.train.checkpoint import save_checkpoint
    from compir.train.mmref import train_mmref
    from compir.train.neucore.train import train_neucore

    root = tmp_path_factory.mktemp("stage2")
    torch.manual_seed(0)
    checkpoint = root / "best.pt"
    save_checkpoint(checkpoint, model=CIRModel(resolve_model_config("micro-tgcir")), metrics={}, step=0, epoch=0)
    # Fixed weights: a random model's validation figures would (rightly) switch the methods off.
    train_neucore(checkpoint, data=synth_data, steps=2, batch_size=6, val_queries=12, weight=NEUCORE_WEIGHT, progress=False)
    train_mmref(checkpoint, data=synth_data, steps=5, train_queries=40, val_queries=12, weight=MMREF_WEIGHT,
                temperature=TEMPERATURE, progress=False)
    export = root / "export"
    export_onnx(checkpoint, out_dir=export, calibration_count=4)
    add_rerankers(export, checkpoint=checkpoint)
    images = root / "images"
    images.mkdir()
    for path in sorted((synth_data / "images").glob("*.png"))[:24]:
        shutil.copy(path, images / path.name)
    build_index(Encoder.from_export(export, providers=["cpu"]), images=images, out=root / "index", workers=1, progress=False)
    return {"checkpoint": checkpoint, "export": export, "index": root / "index"}


def test_export_holds_the_reranker_graph_with_parity_and_the_mmref_matrices(stage2):
    from compir.manifest import load_manifest
    from compir.runtime.rerankers.settings import reranker_settings

    manifest = load_manifest(stage2["export"])
    fp32 = manifest.variant("fp32")
    graph = fp32.graph(RERANKER)
    assert [t.name for t in graph.inputs] == ["token_features", "input_ids", "reference_features", "candidate_features"]
    assert graph.outputs[0].name == "scores" and graph.outputs[0].shape == ("batch",)
    assert fp32.parity[RERANKER] <= 1e-4
    assert {"mmref_references", "mmref_projection", "rerankers"} <= set(manifest.artifacts)
    settings = reranker_settings(stage2["export"], manifest)
    assert settings["neucore"]["weight"] == NEUCORE_WEIGHT and settings["mmref"]["temperature"] == TEMPERATURE


def served_and_torch_neucore(paths: dict[str, Path], *, name: str) -> tuple[Any, str, list[Any], dict[str, float], np.ndarray, np.ndarray]:
    """One composed query served with and without re-ranking (top 8), and NEUCORE's joint scores of
    the first stage's hits from the torch side (model token states, sidecar weights, the index's
    cached features): (retriever, reference item, first-stage hits, re-ranked score by item, joint, composed query)."""
    import compir.runtime.rerankers  # noqa: F401  (registers the factory)
    from compir.runtime.retriever import Retriever
    from compir.train.checkpoint import load_checkpoint
    from compir.train.neucore.model import NeucoreConfig, NeucoreScorer
    from compir.train.neucore.stage2 import load_sidecar, sidecar_path
    from compir.train.neucore.train import concept_input_ids

    retriever = Retriever.from_dirs(paths["export"], paths["index"])
    assert retriever.has_reranker and retriever.reranker is not None and retriever.reranker.name == name
    retriever.rerank_top_n = 8
    item, text = retriever.item_ids()[0], "add a large red circle at the top left"
    first = retriever.search(reference_id=item, text=text, k=8)
    result = retriever.search_detailed(reference_id=item, text=text, k=8, rerank=True)
    assert "rerank" in result.timings_ms and {h.item_id for h in result.hits} == {h.item_id for h in first}
    loaded = load_checkpoint(paths["checkpoint"])
    neucore = load_sidecar(sidecar_path(paths["checkpoint"], "neucore"), kind="neucore")
    scorer = NeucoreScorer(NeucoreConfig(**neucore.config))
    scorer.load_state_dict(neucore.state_dict)
    gallery = retriever.gallery
    rows = [gallery.row(h.item_id) for h in first]
    candidates = torch.from_numpy(gallery.features[rows])
    reference = torch.from_numpy(gallery.features[gallery.row(item)])[None].expand(len(rows), *gallery.features.shape[1:])
    with torch.no_grad():
        _, text_features, tokens = loaded.model.encode_text(torch.from_numpy(retriever.encoder.tokenize([text])))
        concepts = concept_input_ids(loaded.model.tokenizer, scorer, [text])  # the graph attends from the concepts only
        joint = scorer(tokens.expand(len(rows), -1, -1), concepts.expand(len(rows), -1), reference, candidates).numpy()
        loaded.model.use_image_regions(scorer.config.region_grid)
        query = loaded.model.compose(reference[:1], text_features).numpy()
    return retriever, item, first, {h.item_id: h.score for h in result.hits}, joint, query


def test_retriever_reranks_with_both_methods_exactly_as_trained(stage2):
    from compir.train.mmref import reference_coordinates
    from compir.train.neucore.stage2 import load_sidecar, sidecar_path

    retriever, _, first, got, joint, query = served_and_torch_neucore(stage2, name="mmref+neucore")
    mmref = load_sidecar(sidecar_path(stage2["checkpoint"], "mmref"), kind="mmref")
    gallery = retriever.gallery
    rows = [gallery.row(h.item_id) for h in first]
    refs, proj = mmref.state_dict["references"].numpy(), mmref.state_dict["projection"].numpy()
    pooled = gallery.features[rows].mean(axis=1)
    pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    coords = reference_coordinates(pooled, references=refs, projection=proj, temperature=TEMPERATURE)
    query_coords = reference_coordinates(query, references=refs, projection=proj, temperature=TEMPERATURE)[0]
    cosine = np.array([h.score for h in first])
    expected = (1 - MMREF_WEIGHT) * cosine + MMREF_WEIGHT * coords @ query_coords + NEUCORE_WEIGHT * joint
    assert np.allclose([got[h.item_id] for h in first], expected, atol=1e-3)


def test_text_only_queries_use_mmref_alone(stage2):
    import compir.runtime.rerankers  # noqa: F401
    from compir.runtime.retriever import Retriever

    retriever = Retriever.from_dirs(stage2["export"], stage2["index"])
    retriever.rerank_top_n = 8
    hits = retriever.search(text="a small blue square in the center", k=5, rerank=True)
    assert len(hits) == 5 and all(np.isfinite(h.score) for h in hits)


def test_sidecars_of_another_checkpoint_are_refused(stage2, tmp_path):
    from compir.export.rerankers import add_rerankers
    from compir.train.neucore.stage2 import load_sidecar, sidecar_path

    with pytest.raises(ContractError, match="another checkpoint"):
        load_sidecar(sidecar_path(stage2["checkpoint"], "neucore"), kind="neucore", checkpoint_sha256="0" * 64)
    with pytest.raises(ContractError, match="holds a 'neucore'"):
        load_sidecar(sidecar_path(stage2["checkpoint"], "neucore"), kind="mmref")
    other = tmp_path / "other.pt"
    shutil.copy(stage2["checkpoint"], other)
    with open(other, "ab") as handle:  # same weights, other bytes: another checkpoint file
        handle.write(b"\0")
    with pytest.raises(ContractError):
        add_rerankers(stage2["export"], checkpoint=other, neucore=sidecar_path(stage2["checkpoint"], "neucore"))
