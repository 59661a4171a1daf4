"""Readers of the published layouts (written here in miniature), auto-detection and file errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from compir.data.fashioniq import val_query_gallery
from compir.data.files import check_images, raise_image_problems
from compir.data.load import detect_format, load_split
from compir.data.submission import write_cirr_submission
from compir.errors import DatasetError, InputError
from compir.metrics import evaluate_split
from tests.fixtures.data import write_cirr, write_fashioniq, write_json, write_shoes

NAMES = ["dev-0-0-img0", "dev-0-0-img1", "dev-1-0-img0", "dev-1-0-img1", "dev-2-0-img0"]


def cirr_record(pairid: int, reference: str, target: str | None, caption: str, members: list[str]) -> dict:
    record = {"pairid": pairid, "reference": reference, "caption": caption,
              "img_set": {"id": pairid, "members": members, "reference_rank": 0}}
    if target is not None:
        record |= {"target_hard": target, "target_soft": {target: 1.0}}
        record["img_set"]["target_rank"] = members.index(target)
    return record


@pytest.mark.parametrize("official", [False, True])
def test_cirr_layouts_are_read_and_auto_detected(tmp_path, official):
    records = [cirr_record(7, NAMES[0], NAMES[2], "make it red", NAMES[:4]), cirr_record(8, NAMES[1], NAMES[4], "two dogs", NAMES)]
    write_cirr(tmp_path, split="val", records=records, names=NAMES, official=official)
    assert detect_format(tmp_path) == "cirr"
    split = load_split(tmp_path, split="val")
    assert split.protocol == "cirr" and split.gallery == tuple(NAMES)
    first = split.queries[0]
    assert (first.query_id, first.reference, first.text, first.targets) == ("7", NAMES[0], "make it red", (NAMES[2],))
    assert first.subset == tuple(NAMES[:4])
    assert split.image_path(NAMES[3]).is_file()
    assert check_images(split) == []


def test_cirr_test1_has_no_targets_and_gets_a_submission(tmp_path):
    records = [cirr_record(3, NAMES[0], None, "on grass", NAMES[:4]), cirr_record(4, NAMES[4], None, "x", NAMES[2:])]
    write_cirr(tmp_path, split="test1", records=records, names=NAMES)
    split = load_split(tmp_path, split="test")  # alias of test1
    assert split.name == "test1" and all(not q.targets for q in split.queries)
    # gallery item i = e_i; query 3 scores img1 > img3 > img2 > ... and its reference img0 highest
    queries = np.array([[0.9, 0.8, 0.3, 0.5, 0.1], [0.1, 0.2, 0.3, 0.4, 0.9]], dtype=np.float32)
    with pytest.raises(DatasetError, match="hidden labels"):
        evaluate_split(split, query_embeds=queries, gallery_embeds=np.eye(5), gallery_names=NAMES)
    paths = write_cirr_submission(split, query_embeds=queries, gallery_embeds=np.eye(5), gallery_names=NAMES, out_dir=tmp_path / "sub")
    recall = json.loads(paths.recall.read_text())
    subset = json.loads(paths.recall_subset.read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert recall["3"] == [NAMES[1], NAMES[3], NAMES[2], NAMES[4]]  # reference removed
    assert subset["metric"] == "recall_subset" and subset["3"] == [NAMES[1], NAMES[3], NAMES[2]]
    assert subset["4"] == [NAMES[3], NAMES[2]]  # members img2, img3, img4 minus the reference img4


def test_cirr_metrics_through_the_files(tmp_path):
    records = [cirr_record(0, NAMES[0], NAMES[2], "a", NAMES[:4]), cirr_record(1, NAMES[1], NAMES[4], "b", NAMES)]
    write_cirr(tmp_path, split="val", records=records, names=NAMES)
    split = load_split(tmp_path, split="val", fmt="cirr")
    # query 0: reference highest (removed), target 2nd -> rank 1; query 1: target 3rd after img3, img2
    queries = np.array([[0.9, 0.1, 0.8, 0.2, 0.3], [0.1, 0.95, 0.6, 0.7, 0.5]], dtype=np.float32)
    report = evaluate_split(split, query_embeds=queries / np.linalg.norm(queries, axis=1, keepdims=True),
                            gallery_embeds=np.eye(5), gallery_names=NAMES)
    assert report.metrics["R@1"] == 50.0 and report.metrics["R@5"] == 100.0
    assert report.metrics["Rs@1"] == 50.0 and report.metrics["Rs@3"] == 100.0


def test_fashioniq_joins_captions_and_qualifies_names(tmp_path):
    records = [{"candidate": "B1", "target": "B2", "captions": ["is red.", "has long sleeves?"]}]
    write_fashioniq(tmp_path, category="dress", split="val", records=records, names=["B1", "B2", "B3"])
    shirts = [{"candidate": "S1", "target": "S2", "captions": ["a", "b"]}]
    write_fashioniq(tmp_path, category="shirt", split="val", records=shirts, names=["S1", "S2"])
    write_fashioniq(tmp_path, category="shirt", split="test", records=[{"candidate": "S1", "captions": ["a", "b"]}], names=["S1", "S2"])
    assert detect_format(tmp_path) == "fashioniq"
    both = load_split(tmp_path, split="val")
    assert both.gallery == ("dress/B1", "dress/B2", "dress/B3", "shirt/S1", "shirt/S2")
    dress = both.queries[0]
    assert (dress.text, dress.reference, dress.targets, dress.group) == ("Is red and has long sleeves", "dress/B1", ("dress/B2",), "dress")
    one = load_split(tmp_path, split="dress.val")
    assert len(one.queries) == 1 and one.gallery == ("dress/B1", "dress/B2", "dress/B3")
    assert load_split(tmp_path, split="test").queries[0].targets == ()
    assert check_images(both) == []


def test_shoes_splits_by_name_lists_and_finds_nested_images(tmp_path):
    train, test = ["img_a_1.jpg", "img_a_2.jpg"], ["img_b_1.jpg", "img_b_2.jpg", "img_b_3.jpg"]
    records = [
        {"ImageName": "img_a_2.jpg", "ReferenceImageName": "img_a_1.jpg", "RelativeCaption": "taller"},
        {"ImageName": "img_b_3.jpg", "ReferenceImageName": "img_b_1.jpg", "RelativeCaption": "is black"},
        {"ImageName": "img_b_3.jpg", "ReferenceImageName": "img_a_1.jpg", "RelativeCaption": "crosses splits"},
    ]
    write_shoes(tmp_path, records=records, train=train, test=test)
    assert detect_format(tmp_path) == "shoes"
    split = load_split(tmp_path, split="test")
    assert split.protocol == "shoes" and split.gallery == tuple(test)
    assert [(q.reference, q.text, q.targets) for q in split.queries] == [("img_b_1.jpg", "is black", ("img_b_3.jpg",))]
    assert split.image_path("img_b_2.jpg").parent.parent.name == "womens_boots"
    assert len(load_split(tmp_path, split="train").queries) == 1


def test_malformed_json_and_missing_fields_name_the_file(tmp_path):
    write_cirr(tmp_path, split="val", records=[cirr_record(0, NAMES[0], NAMES[1], "a", NAMES)], names=NAMES)
    captions = tmp_path / "captions" / "cap.rc2.val.json"
    captions.write_text("[{\"pairid\": 0,", encoding="utf-8")
    with pytest.raises(DatasetError, match="cap.rc2.val.json.*not valid JSON"):
        load_split(tmp_path, split="val")
    write_json(captions, [{"pairid": 0, "caption": "no reference"}])
    with pytest.raises(DatasetError, match=r"cap.rc2.val.json: record 0 lacks field\(s\) reference"):
        load_split(tmp_path, split="val")
    with pytest.raises(DatasetError, match="cap.rc2.train.json is missing; splits found: val"):
        load_split(tmp_path, split="train")
    with pytest.raises(DatasetError, match="no known dataset layout"):
        load_split(tmp_path / "captions", split="val")


def test_missing_and_corrupt_images_are_all_reported(tmp_path):
    write_cirr(tmp_path, split="val", records=[cirr_record(0, NAMES[0], NAMES[1], "a", NAMES)], names=NAMES)
    split = load_split(tmp_path, split="val")
    split.image_path(NAMES[3]).unlink()
    split.image_path(NAMES[4]).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    problems = check_images(split)
    assert [p.name for p in problems] == [NAMES[3], NAMES[4]]
    assert "missing" in problems[0].problem
    assert "corrupt" in problems[1].problem or "not a readable image" in problems[1].problem
    with pytest.raises(DatasetError, match=f"2 bad image.*{NAMES[3]}.png.*{NAMES[4]}.png"):
        raise_image_problems(problems, split=split)
    with pytest.raises(DatasetError, match=f"2 bad image.*{NAMES[3]}.png.*{NAMES[4]}.png"):
        load_split(tmp_path, split="val", check=True)
    # the first image itself missing: the loader says where it looked
    split.image_path(NAMES[0]).unlink()
    with pytest.raises(DatasetError, match="images of .* not found; looked for the first one"):
        load_split(tmp_path, split="val")


def test_data_and_metrics_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import compir.data.load, compir.data.cli, compir.data.submission, compir.data.baselines, compir.metrics\n"
        "bad = [m for m in ('torch', 'open_clip', 'gradio', 'onnx', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_fashioniq_and_shoes_metrics_through_the_files(tmp_path):
    dress = [f"D{i}" for i in range(12)]
    write_fashioniq(tmp_path / "fiq", category="dress", split="val",
                    records=[{"candidate": "D0", "target": "D1", "captions": ["a", "b"]}], names=dress)
    write_fashioniq(tmp_path / "fiq", category="shirt", split="val",
                    records=[{"candidate": "S0", "target": "S1", "captions": ["c", "d"]}], names=["S0", "S1"])
    split = load_split(tmp_path / "fiq", split="val")
    names = list(split.gallery)
    # dress query: reference D0 (kept) + 8 dresses ahead of D1 -> rank 10, a hit at R@10; the two
    # shirts score higher still and would push it to 12 were categories mixed
    dress_row = [0.99, 0.4] + [0.5] * 8 + [0.1, 0.1] + [1.0, 1.0]
    shirt_row = [0.0] * 12 + [0.3, 0.2]  # S0 (the reference, kept) ahead of S1: rank 2
    report = evaluate_split(split, query_embeds=np.array([dress_row, shirt_row], dtype=np.float32),
                            gallery_embeds=np.eye(len(names), dtype=np.float32), gallery_names=names)
    assert report.breakdown == {"dress": {"R@10": 100.0, "R@50": 100.0}, "shirt": {"R@10": 100.0, "R@50": 100.0}}

    records = [{"ImageName": "t.jpg", "ReferenceImageName": "r.jpg", "RelativeCaption": "darker"}]
    write_shoes(tmp_path / "shoes", records=records, train=["x.jpg"], test=["r.jpg", "o.jpg", "t.jpg"])
    shoes = load_split(tmp_path / "shoes", split="test")
    # the reference r is kept in the Shoes gallery and scores highest: target t is 2nd
    report = evaluate_split(shoes, query_embeds=np.array([[0.9, 0.1, 0.5]], dtype=np.float32),
                            gallery_embeds=np.eye(3, dtype=np.float32), gallery_names=list(shoes.gallery))
    assert report.metrics == {"R@1": 0.0, "R@10": 100.0, "R@50": 100.0}


def test_fashioniq_val_queries_gallery_is_tgcirs_protocol(tmp_path):
    names = [f"D{i}" for i in range(30)]
    # 11 queries D0->D1, D2->D3, ..., D20->D21: the val-query images are D0..D21; D22..D29 are in the split only
    records = [{"candidate": f"D{2 * i}", "target": f"D{2 * i + 1}", "captions": ["a", "b"]} for i in range(11)]
    write_fashioniq(tmp_path, category="dress", split="val", records=records, names=names)
    full = load_split(tmp_path, split="val")
    tgcir = val_query_gallery(full)
    assert tgcir.protocol == "fashioniq-val-queries" and full.protocol == "fashioniq"
    assert tgcir.gallery == tuple(f"dress/D{i}" for i in range(22)) and len(full.gallery) == 30

    def rows(gallery: tuple[str, ...]) -> np.ndarray:
        scores = np.zeros((11, len(gallery)), dtype=np.float32)
        column = {name: j for j, name in enumerate(gallery)}
        for i in range(1, 11):
            scores[i, column[f"dress/D{2 * i + 1}"]] = 1.0  # queries 1..10 find their target first
        # query 0: its reference D0 and 9 val-query images ahead of its target D1, and the 8 split-only images too
        planted = {"D0": 0.99, "D1": 0.5, **{f"D{i}": 0.9 for i in range(2, 11)}, **{f"D{i}": 0.95 for i in range(22, 30)}}
        for name, score in planted.items():
            if f"dress/{name}" in column:
                scores[0, column[f"dress/{name}"]] = score
        return scores

    def recall10(split) -> float:
        report = evaluate_split(split, query_embeds=rows(split.gallery), gallery_embeds=np.eye(len(split.gallery), dtype=np.float32),
                                gallery_names=list(split.gallery))
        assert report.protocol == split.protocol
        return report.metrics["R@10"]

    # CLIP4Cir: 18 images ahead of D1 (the reference kept) -> rank 19, a miss; TG-CIR: 9 ahead -> rank 10, a hit
    assert recall10(full) == pytest.approx(100.0 * 10 / 11)
    assert recall10(tgcir) == 100.0
    # the reference removal is what makes it a hit: kept, it would be the 10th image ahead
    kept = evaluate_split(dataclasses.replace(tgcir, protocol="fashioniq"), query_embeds=rows(tgcir.gallery),
                          gallery_embeds=np.eye(22, dtype=np.float32), gallery_names=list(tgcir.gallery))
    assert kept.metrics["R@10"] == pytest.approx(100.0 * 10 / 11)
    with pytest.raises(InputError, match="val-queries"):
        val_query_gallery(dataclasses.replace(full, protocol="cirr"))
