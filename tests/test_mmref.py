"""MMRef: identities (scene file, clusters), references recover identities, fine-tuning moves the encoders
and exports, the runtime's numpy refinement matches the torch one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compir.data.types import CirSplit
from compir.errors import InputError
from compir.runtime.rerankers.mmref import MMRefStage
from compir.runtime.rerankers.settings import pooled_vectors
from compir.train.mmref import (
    MODALITIES,
    Identities,
    IdentityAssignment,
    assign_identities,
    cluster_vectors,
    fit_references,
    reference_coordinates,
    train_mmref,
)
from compir.train.mmref.identities import describe


def _clustered(identities: int = 24, dim: int = 16, seed: int = 0) -> tuple[Identities, np.ndarray]:
    """Members = identity centre + noise, one per modality, plus a held-back probe per identity."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    vectors, owner, modality = [], [], []
    for i, centre in enumerate(centres):
        for m in range(len(MODALITIES)):
            vectors.append(centre + 0.6 * rng.normal(size=dim))
            owner.append(i)
            modality.append(m)
    stacked = np.stack(vectors)
    stacked /= np.linalg.norm(stacked, axis=1, keepdims=True)
    probes = centres + 0.6 * rng.normal(size=centres.shape)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    found = Identities([f"id{i}" for i in range(identities)], stacked.astype(np.float32), np.asarray(owner), np.asarray(modality))
    return found, probes.astype(np.float32)


def test_references_recover_the_identities_of_unseen_members():
    identities, probes = _clustered()
    references, projection = fit_references(identities, steps=120, batch_identities=16, progress=False)
    assert references.shape == (24, 16) and projection.shape == (16, 16)
    assert np.allclose(np.linalg.norm(references, axis=1), 1.0, atol=1e-5)
    coordinates = reference_coordinates(probes, references=references, projection=projection, temperature=0.05)
    # A fresh noisy view of identity i lands nearest reference i far above chance (1 / 24).
    assert np.mean(coordinates.argmax(axis=1) == np.arange(24)) >= 0.75


def test_runtime_refinement_matches_the_training_side():
    identities, probes = _clustered(seed=1)
    references, projection = fit_references(identities, steps=20, batch_identities=16, progress=False)
    stage = MMRefStage(references=references, projection=projection, weight=0.4, temperature=0.05)
    expected = reference_coordinates(probes, references=references, projection=projection, temperature=0.05)
    assert np.max(np.abs(stage.coordinates(probes) - expected)) < 1e-5
    first = probes[1:] @ probes[0]
    refined = stage.refine(probes[0], probes[1:], first)
    assert np.allclose(refined, 0.6 * first + 0.4 * (expected[1:] @ expected[0]), atol=1e-5)
    off = MMRefStage(references=references, projection=projection, weight=0.0, temperature=0.05)
    assert np.allclose(off.refine(probes[0], probes[1:], first), first)


def test_pooled_vectors_equal_the_gallery_vectors_of_both_heads():
    rng = np.random.default_rng(2)
    tokens = rng.normal(size=(3, 5, 8)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    mean = tokens.mean(axis=1)
    assert np.allclose(pooled_vectors(tokens), mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
    vectors = tokens[:, 0]
    assert np.allclose(pooled_vectors(vectors), vectors, atol=1e-6)


@pytest.mark.parametrize("module", ["compir.runtime.rerankers", "compir.runtime.rerankers.neucore"])
def test_runtime_rerankers_import_no_torch(module):
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in ('torch', 'open_clip', 'onnx', 'gradio') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_synthetic_benchmark_writes_scene_identities_that_group_images(synth_data):
    from compir.data.load import load_split
    from compir.data.synth_scene import parse_scene_key, scene_identity
    from compir.data.synthetic import read_dataset_record

    assert "captions/identity.train.json" in read_dataset_record(synth_data)["sha256"]
    train = load_split(synth_data, split="train")
    assert set(train.identities) == set(train.gallery)
    assert all(identity == scene_identity(parse_scene_key(name)) for name, identity in train.identities.items())
    assignment = assign_identities(train, source="auto", images=list(train.gallery))
    assert assignment.source == "scenes"
    # a move edit keeps the objects: its target shares the reference's identity
    moves = [q for q in train.queries if q.kind == "move"]
    assert moves and all(train.identities[q.reference] == train.identities[q.targets[0]] for q in moves)
    assert max(assignment.images_per_identity()) >= 2


def test_clusters_hold_at_least_two_images_each_and_one_image_identities_are_called_degenerate(synth_data):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(101, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = cluster_vectors(vectors, count=40)
    assert np.bincount(labels).min() >= 2 and len(np.unique(labels)) > 10
    split = CirSplit(name="train", protocol="cirr", root=Path("."), queries=(), gallery=tuple(f"i{k}" for k in range(101)))
    clusters = assign_identities(split, source="clusters", images=list(split.gallery), image_embeds=vectors)
    assert min(clusters.images_per_identity()) >= 2 and "ONE image" not in describe(clusters)
    with pytest.raises(InputError, match="synthetic benchmark"):
        assign_identities(split, source="scenes", images=list(split.gallery))
    own = IdentityAssignment("dataset", {name: name for name in split.gallery})
    assert own.degenerate() and "ONE image" in describe(own)


def test_finetuning_moves_the_encoders_and_writes_an_exportable_checkpoint(synth_data, tmp_path):
    import torch

    from compir.export.rerankers import add_rerankers
    from compir.export.to_onnx import export_onnx
    from compir.manifest import load_manifest
    from compir.train.checkpoint import load_checkpoint, save_checkpoint
    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    torch.manual_seed(0)
    start = tmp_path / "best.pt"
    save_checkpoint(start, model=CIRModel(resolve_model_config("micro-tgcir")), metrics={}, step=0, epoch=0)
    result = train_mmref(start, data=synth_data, steps=3, train_queries=40, val_queries=12, weight=0.3, temperature=0.05,
                         identities="scenes", finetune_steps=2, finetune_batch_size=8, progress=False)
    assert result.checkpoint == tmp_path / "mmref-finetuned.pt" and result.path == tmp_path / "mmref-finetuned.mmref.pt"
    assert result.identities == "scenes" and set(result.finetune_losses) == {"own", "guided", "reconstruction"}
    before, after = load_checkpoint(start).model.state_dict(), load_checkpoint(result.checkpoint).model.state_dict()
    moved = [key for key in before if key.startswith("backbone.") and not torch.equal(before[key], after[key])]
    assert any("visual" in key for key in moved) and any("transformer" in key and "visual" not in key for key in moved)
    export = tmp_path / "export"
    export_onnx(result.checkpoint, out_dir=export, calibration_count=4)
    add_rerankers(export, checkpoint=result.checkpoint)
    assert {"mmref_references", "mmref_projection"} <= set(load_manifest(export).artifacts)
