"""NEUCORE scorer: concepts, weak-label losses reach the right parameters, stage-2 evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compir.data.types import CirSplit, Query
from compir.metrics import evaluate_split
from compir.train.neucore.model import NeucoreConfig, NeucoreScorer
from compir.train.neucore.stage2 import evaluate_scores, rerank_matrix
from compir.train.neucore.train import _masked_bce, _presence
from compir.train.text import tokenize

WIDTH, DIM, TOKENS, LENGTH = 16, 12, 3, 16


@pytest.fixture()
def scorer() -> NeucoreScorer:
    torch.manual_seed(0)
    return NeucoreScorer(NeucoreConfig(text_width=WIDTH, feature_dim=DIM, hidden_dim=24))


def _inputs(count: int, texts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = tokenize(texts or ["add a red cube"] * count, context_length=LENGTH)
    tokens = torch.randn(count, LENGTH, WIDTH, generator=generator)
    reference = torch.randn(count, TOKENS, DIM, generator=generator)
    candidates = torch.randn(count, TOKENS, DIM, generator=generator)
    return tokens, ids, reference, candidates


def test_concepts_are_the_non_special_tokens(scorer):
    ids = tokenize(["make it red"], context_length=LENGTH)
    mask = scorer.concept_mask(ids)[0]
    words = int((ids[0] != 0).sum()) - 2  # minus SOT and EOT
    assert mask.sum() == words and mask[0] == 0 and mask[words + 1] == 0


def test_scores_ignore_padding_and_depend_on_the_candidate(scorer):
    tokens, ids, reference, candidates = _inputs(4)
    with torch.no_grad():
        base = scorer(tokens, ids, reference, candidates)
        padded = tokens.clone()
        padded[:, 10:] = 100.0  # padding positions: skipped by the progressive fusion
        assert torch.allclose(base, scorer(padded, ids, reference, candidates), atol=1e-5)
        assert not torch.allclose(base, scorer(tokens, ids, reference, candidates.flip(0)), atol=1e-4)
        vectors = scorer(tokens, ids, reference[:, 0], candidates[:, 0])  # (N, D) features read as one region
    assert base.shape == (4,) and vectors.shape == (4,)


def test_presence_labels_come_from_the_descriptions():
    ids = tokenize(["add a red cube", "remove the circle"], context_length=LENGTH)
    labels = _presence(ids, ["a small red square", "a large blue circle"])
    red = int(tokenize(["red"], context_length=4)[0, 1])
    circle = int(tokenize(["circle"], context_length=4)[0, 1])
    assert labels[0][ids[0] == red].item() == 1.0 and labels[1][ids[1] == circle].item() == 1.0
    cube = int(tokenize(["cube"], context_length=4)[0, 1])
    assert labels[0][ids[0] == cube].item() == 0.0


def _grads(scorer: NeucoreScorer, loss: torch.Tensor) -> dict[str, float]:
    scorer.zero_grad(set_to_none=True)
    loss.backward()
    return {name: 0.0 if p.grad is None else float(p.grad.norm()) for name, p in scorer.named_parameters()}


def test_image_level_mil_trains_alignment_not_fusion(scorer):
    tokens, ids, reference, candidates = _inputs(4)
    out = scorer.run(tokens, ids, reference, candidates)
    labels = torch.ones_like(out.reference_presence)
    grads = _grads(scorer, _masked_bce(out.reference_presence, labels, out.concept_mask))
    assert grads["presence_scale"] > 0 and grads["text_projection.1.weight"] > 0 and grads["image_projection.1.weight"] > 0
    assert grads["block.update.0.weight"] == 0 and grads["score_head.0.weight"] == 0


def test_sentence_level_loss_trains_the_shared_fusion_block(scorer):
    tokens, ids, reference, candidates = _inputs(4, ["add a red cube", "remove the circle", "make it blue", "move the square left"])
    scores = scorer.run(tokens, ids, reference, candidates).scores
    grads = _grads(scorer, torch.nn.functional.cross_entropy(scores.view(2, 2), torch.arange(2)))
    assert grads["block.update.0.weight"] > 0 and grads["block.gate.weight"] > 0 and grads["salience.weight"] > 0


def test_rerank_matrix_evaluates_like_the_first_stage_and_reorders_the_top():
    rng = np.random.default_rng(0)
    gallery = tuple(f"g{i}" for i in range(12))
    queries = tuple(Query(query_id=str(i), reference=f"g{i}", text="t", targets=(f"g{(i + 1) % 12}",)) for i in range(6))
    split = CirSplit(name="toy", protocol="cirr", root=Path("."), queries=queries, gallery=gallery)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    g = rng.normal(size=(12, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    direct = evaluate_split(split, query_embeds=q, gallery_embeds=g, gallery_names=gallery)
    scores = q @ g.T
    assert evaluate_scores(split, scores).metrics == direct.metrics
    columns = [np.argsort(-row)[:5] for row in scores]
    # A re-ranker that knows the answer puts the target first whenever it is in the top-5.
    oracle = rerank_matrix(scores, columns, lambda i, cols, s: np.array([gallery[c] in queries[i].targets for c in cols], float))
    in_top = np.mean([any(gallery[c] in queries[i].targets for c in cols) for i, cols in enumerate(columns)])
    assert evaluate_scores(split, oracle).metrics["R@1"] == pytest.approx(100 * in_top)
