"""MMRef: references recover identities, the runtime's numpy refinement matches the torch one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from compir.runtime.rerankers.mmref import MMRefStage
from compir.runtime.rerankers.settings import pooled_vectors
from compir.train.mmref import MODALITIES, Identities, fit_references, reference_coordinates


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
