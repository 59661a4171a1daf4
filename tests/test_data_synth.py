"""The synthetic benchmark: determinism, sibling structure, held-out combinations, hardness gate."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np
import pytest

from compir.data.baselines import image_only_pixel_report
from compir.data.cli import main as data_main
from compir.data.load import detect_format, load_split
from compir.data.synth import SynthConfig, sample_train_batch, sample_train_query
from compir.data.synth_edits import TEMPLATES
from compir.data.synth_scene import Scene, SceneObject, parse_scene_key, render_scene, render_scene_array, scene_caption
from compir.data.synth_write import write_synthetic
from compir.data.synthetic import read_dataset_record, synth_config_of
from compir.errors import ContractError, DatasetError
from tests.fixtures.data import FIXTURE_CONFIG

TINY = SynthConfig(n_train=40, n_val=16, n_test=24)


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    write_synthetic(tmp_path / "a", seed=3, config=TINY, workers=1)
    write_synthetic(tmp_path / "b", seed=3, config=TINY, workers=2)  # the process pool changes nothing
    write_synthetic(tmp_path / "c", seed=4, config=TINY, workers=1)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_layout_and_dataset_record(synth_data):
    assert detect_format(synth_data) == "synthetic"
    record = read_dataset_record(synth_data)
    assert record["format"] == "compir.synthetic" and record["schema_version"] == 1
    assert set(record["sha256"]) >= {"captions/cap.rc2.test.json", "image_splits/split.rc2.test.json"}
    assert synth_config_of(synth_data) == FIXTURE_CONFIG
    for split, n in (("train", FIXTURE_CONFIG.n_train), ("val", FIXTURE_CONFIG.n_val), ("test", FIXTURE_CONFIG.n_test)):
        data = load_split(synth_data, split=split)
        assert data.protocol == "synthetic" and len(data.queries) == n == record["counts"][split]["queries"]
        assert all(q.targets[0] in data.image_paths and q.kind for q in data.queries)
        assert set(data.captions) == set(data.gallery)
        name = data.gallery[0]
        assert data.image_path(name).name == f"{name}.png"
        assert data.captions[name] == (scene_caption(parse_scene_key(name)),)


def test_every_test_reference_has_siblings_and_raw_pixels_cannot_pick_the_target(synth_data):
    test = load_split(synth_data, split="test")
    gallery = set(test.gallery)
    by_reference = defaultdict(set)
    for query in test.queries:
        by_reference[query.reference].add(query.targets[0])
        siblings = set(query.subset) - {query.reference, query.targets[0]}
        assert len(siblings) == FIXTURE_CONFIG.edits_per_reference - 1
        assert siblings <= gallery and query.targets[0] in query.subset
    # n_test is a multiple of edits_per_reference: every reference is queried with all its edits
    assert {len(targets) for targets in by_reference.values()} == {FIXTURE_CONFIG.edits_per_reference}
    report = image_only_pixel_report(test)
    assert report.metrics["R@1"] <= 20.0, report.format_table()
    assert report.metrics["Rs@1"] <= 20.0


def test_held_out_pairs_appear_only_in_unseen_targets(synth_data):
    held_out = set(FIXTURE_CONFIG.held_out)
    train = load_split(synth_data, split="train")
    for name in train.gallery:
        assert not parse_scene_key(name).pairs() & held_out, name
    for split in ("val", "test"):
        data = load_split(synth_data, split=split)
        unseen = [q for q in data.queries if q.unseen]
        assert 0.1 * len(data.queries) <= len(unseen) <= 0.5 * len(data.queries)
        for query in data.queries:
            assert not parse_scene_key(query.reference).pairs() & held_out
            assert bool(parse_scene_key(query.targets[0]).pairs() & held_out) == query.unseen
            assert query.unseen is False or query.kind in ("add", "change")


def test_texts_use_every_kind_and_many_templates(synth_data):
    queries = load_split(synth_data, split="train").queries + load_split(synth_data, split="test").queries
    assert set(Counter(q.kind for q in queries)) == {"add", "remove", "change", "move"}
    assert all(len(templates) >= 4 for templates in TEMPLATES.values())
    openings = defaultdict(set)
    for query in queries:
        openings[query.kind].add(" ".join(query.text.split()[:2]))
    assert all(len(words) >= 4 for words in openings.values()), openings
    assert len({q.text for q in queries}) > 0.9 * len(queries)


def test_render_scene_is_deterministic_and_identical_scenes_share_a_name():
    red = SceneObject("circle", "red", "small")
    scene = Scene((red,) + (None,) * 8)
    same = parse_scene_key(scene.key)
    assert same == scene and same.key == scene.key
    image = render_scene(scene, size=64)
    assert image.size == (64, 64) and image.mode == "RGB"
    pixels = render_scene_array(scene, size=64)
    assert np.array_equal(np.asarray(image), pixels)
    top_left = pixels[:21, :21].reshape(-1, 3)
    assert (top_left[:, 0] > 180).any() and (top_left[:, 1] < 80).any()  # a red object, top left
    assert (pixels[30:, 30:] == pixels[-1, -1]).all()  # the rest is background
    bigger = render_scene_array(Scene((SceneObject("circle", "red", "large"),) + (None,) * 8), size=64)
    assert (bigger != pixels).sum() > 50
    with pytest.raises(ValueError, match="not a synthetic scene key"):
        parse_scene_key("dress/B00")


def test_train_sampler_never_yields_held_out_pairs():
    config = SynthConfig()
    rng = np.random.default_rng(0)
    kinds = Counter()
    for _ in range(2000):
        query = sample_train_query(rng, config=config)
        assert not (query.reference.pairs() | query.target.pairs()) & set(config.held_out)
        assert query.reference != query.target and not query.unseen
        kinds[query.kind] += 1
    assert set(kinds) == {"add", "remove", "change", "move"}


def test_a_tampered_dataset_fails_loudly(tmp_path, capsys):
    root = tmp_path / "synth"
    assert data_main(["synth", "--out", str(root), "--n-train", "20", "--n-val", "8", "--n-test", "8", "--workers", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        data_main(["synth", "--out", str(tmp_path / "bad"), "--image-size", "4"])
    assert "image_size must be >= 12" in capsys.readouterr().err
    with pytest.raises(ContractError, match="not empty"):
        data_main(["synth", "--out", str(root), "--n-train", "20"])
    assert data_main(["check", str(root), "--split", "test"]) == 0
    assert data_main(["info", str(root), "--split", "val"]) == 0
    info = capsys.readouterr().out
    assert "val: protocol synthetic, 8 queries" in info and "kind:" in info and "unseen:" in info
    captions = root / "captions" / "cap.rc2.test.json"
    captions.write_text(captions.read_text(encoding="utf-8") + " ", encoding="utf-8")
    with pytest.raises(DatasetError, match="cap.rc2.test.json does not match its sha256"):
        load_split(root, split="test")


def test_train_batches_are_rendered_in_memory_and_reproducible():
    config = SynthConfig(image_size=48)
    batch = sample_train_batch(np.random.default_rng(5), batch_size=32, config=config)
    assert batch.reference_pixels.shape == batch.target_pixels.shape == (32, 48, 48, 3)
    assert batch.reference_pixels.dtype == np.uint8 and len(batch.texts) == len(batch.target_names) == 32
    for pixels, name in zip(batch.target_pixels, batch.target_names, strict=True):
        assert np.array_equal(pixels, render_scene_array(parse_scene_key(name), size=48))
    again = sample_train_batch(np.random.default_rng(5), batch_size=32, config=config)
    assert again.texts == batch.texts and np.array_equal(again.target_pixels, batch.target_pixels)
