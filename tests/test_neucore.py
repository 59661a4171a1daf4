"""NEUCORE scorer: concepts, weak-label losses reach the right parameters, stage-2 evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compir.concepts import concept_ids, mine_concepts
from compir.data.types import CirSplit, Query
from compir.metrics import evaluate_split
from compir.train.neucore.model import NeucoreConfig, NeucoreScorer
from compir.train.neucore.stage2 import evaluate_scores, rerank_matrix
from compir.train.neucore.train import concept_in_target_loss, concept_input_ids
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


def test_concepts_are_content_phrases_of_the_text():
    assert mine_concepts("Make it a red cube, and remove the circle.") == [("red", "cube"), ("circle",)]
    assert mine_concepts("is darker and has long sleeves") == [("darker",), ("long", "sleeves")]
    assert mine_concepts("make it so") == []


def test_concept_ids_keep_exactly_the_tokens_of_the_concept_words(scorer):
    text = "make it a red cube and remove the circle"
    ids = concept_input_ids(lambda texts: tokenize(texts, context_length=LENGTH), scorer, [text])[0]
    word = {w: int(tokenize([w], context_length=4)[0, 1]) for w in ("red", "cube", "circle", "make", "the")}
    kept = set(ids[ids != 0].tolist())
    assert kept == {word["red"], word["cube"], word["circle"]}
    full = tokenize([text], context_length=LENGTH)[0]
    assert torch.equal(ids[ids != 0], full[torch.isin(full, ids[ids != 0])])  # same positions as the full text
    # A word of several tokens keeps all of them; a text without content words keeps every id.
    many = concept_ids(np.array([1, 5, 6, 7, 2, 0]), "zzyzx it", lambda piece: 3 if piece == "zzyzx" else 1, first=1)
    assert many.tolist() == [0, 5, 6, 7, 0, 0]
    assert concept_ids(np.array([1, 5, 2]), "make", lambda piece: 1, first=1).tolist() == [1, 5, 2]


def _grads(scorer: NeucoreScorer, loss: torch.Tensor) -> dict[str, float]:
    scorer.zero_grad(set_to_none=True)
    loss.backward()
    return {name: 0.0 if p.grad is None else float(p.grad.norm()) for name, p in scorer.named_parameters()}


def test_image_level_loss_wants_each_concept_in_its_own_target_and_trains_alignment_not_fusion(scorer):
    tokens, ids, reference, candidates = _inputs(4)
    out = scorer.run(tokens, ids, reference, candidates)
    presence, mask = out.candidate_presence.view(2, 2, -1), out.concept_mask.view(2, 2, -1)[:, 0]
    grads = _grads(scorer, concept_in_target_loss(presence, mask))
    assert grads["presence_scale"] > 0 and grads["text_projection.1.weight"] > 0 and grads["image_projection.1.weight"] > 0
    assert grads["block.update.0.weight"] == 0 and grads["score_head.0.weight"] == 0
    # Shown by its own target more than by the other: a lower loss; padding positions do not count.
    own = torch.full((2, 2, LENGTH), -5.0)
    own[0, 0], own[1, 1] = 5.0, 5.0
    assert concept_in_target_loss(own, mask) < 0.01 < concept_in_target_loss(own.flip(1), mask)
    assert concept_in_target_loss(own, mask) == concept_in_target_loss(torch.where(mask.bool()[:, None], own, 99.0), mask)


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


def test_the_exported_graph_loops_over_the_packed_concepts_and_scores_as_the_full_length(scorer, tmp_path):
    from compir.concepts import pack_concepts
    from compir.export.graphs import GraphDef, export_graph
    from compir.export.rerankers import RERANKER_INPUTS, _LoopedScorer
    from compir.runtime.backends.ort import open_session

    length, count = 77, 5
    texts = ["make the large dress dark red with long sleeves", "remove the small blue square and add a green circle", "red"]
    ids = concept_input_ids(lambda batch: tokenize(batch, context_length=length), scorer, texts)
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randn(len(texts), length, WIDTH, generator=generator)
    reference, candidates = torch.randn(count, TOKENS, DIM, generator=generator), torch.randn(count, TOKENS, DIM, generator=generator)
    graph = GraphDef("reranker", _LoopedScorer(scorer).eval(), RERANKER_INPUTS, ("scores",), sequence_names=("token_features", "input_ids"))
    feeds = {"token_features": np.zeros((count, 3, WIDTH), np.float32), "input_ids": np.zeros((count, 3), np.int64),
             "reference_features": reference.numpy(), "candidate_features": candidates.numpy()}
    export_graph(graph, feeds=feeds, path=tmp_path / "reranker.onnx", opset=17)  # traced at 3 positions
    session = open_session(tmp_path / "reranker.onnx")
    assert session.get_inputs()[0].shape[1] == "sequence"
    from compir.export.trt.lint import lint_graph

    assert lint_graph(tmp_path / "reranker.onnx") == []  # the Loop (no scan outputs, steady carried state) parses on TensorRT
    for row in range(len(texts)):
        with torch.no_grad():
            full = scorer(tokens[row].expand(count, -1, -1), ids[row].expand(count, -1), reference, candidates).numpy()
        states, packed = pack_concepts(tokens[row].numpy(), ids[row].numpy())
        concepts = [i for i in ids[row].tolist() if i != 0]
        assert packed.tolist() == concepts and len(states) == len(concepts)  # the concept tokens alone, in text order
        got = session.run(["scores"], {**feeds, "token_features": np.repeat(states[None], count, 0),
                                       "input_ids": np.repeat(packed[None], count, 0)})[0]
        np.testing.assert_allclose(got, full, atol=1e-5)  # 1 to 8 loop steps score as 77 unrolled ones
        # A graph of fixed positions (an older export) takes them padded: the same scores.
        fixed_states, fixed_ids = pack_concepts(tokens[row].numpy(), ids[row].numpy(), slots=12)
        assert fixed_ids[: len(concepts)].tolist() == concepts and not fixed_ids[len(concepts):].any()
        with torch.no_grad():
            padded = scorer(torch.from_numpy(fixed_states).expand(count, -1, -1), torch.from_numpy(fixed_ids).expand(count, -1),
                            reference, candidates).numpy()
        np.testing.assert_allclose(padded, full, atol=1e-5)
    with pytest.raises(ValueError, match=r"the text has \d+ concept positions, the graph takes 4"):
        pack_concepts(tokens[0].numpy(), ids[0].numpy(), slots=4)


def test_packing_pairs_ids_and_states_across_a_dropped_cls_position():
    from compir.concepts import pack_concepts

    ids = np.array([101, 0, 7, 0, 9, 102, 0])  # the tower's states start at id 1 (a CLS pooler dropped id 0)
    states = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # state p <-> id p + 1
    packed_states, packed_ids = pack_concepts(states, ids, slots=4, id_slots=5)
    assert packed_ids.tolist() == [0, 7, 9, 102, 0]
    np.testing.assert_array_equal(packed_states[:, 0], [1, 3, 4, 0])  # the states of ids 7, 9 and 102; then padding
    assert pack_concepts(states[:0], np.zeros(0, np.int64))[0].shape == (1, 2)  # no concept: one padding position
