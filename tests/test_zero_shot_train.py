"""Zero-shot training: CLIP's objective on image-caption pairs, then Pic2Word's mapping net on images only,
and their evaluation beside the three training-free baselines (``compir train --objective clip``,
``--head pic2word``, ``compir eval``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from compir.cli import main as compir_main
from compir.data.load import load_split
from compir.errors import DatasetError
from compir.evaluate import evaluate_path
from compir.train.checkpoint import load_checkpoint
from compir.train.loop import TrainOptions, train
from compir.train.unlabeled_sources import FileSource, ImageBatch, SceneSource

FAST = {"model": "micro", "batch_size": 16, "amp": "off", "progress": False, "workers": 0, "val_queries": 40}


@pytest.fixture(scope="module")
def clip_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("zs") / "clip"
    return train(TrainOptions(data=synth_data, out_dir=out, objective="clip", epochs=1, steps_per_epoch=40, lr=2e-3,
                              warmup_steps=5, **{**FAST, "batch_size": 32}))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pic2word_run(clip_run, synth_data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("zs") / "pic2word"
    options = {**FAST, "batch_size": 32}
    del options["model"]  # --init takes the checkpoint's
    return train(TrainOptions(data=synth_data, out_dir=out, init=clip_run.best_checkpoint, head="pic2word", epochs=1,
                              steps_per_epoch=30, lr=2e-3, warmup_steps=5, **options))  # type: ignore[arg-type]


def _losses(run) -> list[float]:
    return json.loads((run.out_dir / "train_log.json").read_text())["losses"]


def test_clip_objective_then_pic2word_on_synthetic_losses_fall_and_eval_runs(clip_run, pic2word_run, synth_data: Path) -> None:
    clip_log = json.loads((clip_run.out_dir / "train_log.json").read_text())
    assert clip_log["objective"] == "clip" and clip_log["options"]["objective"] == "clip"
    assert set(clip_run.best_metrics) == {"R@1", "R@5", "R@10"}  # text -> image recall on the val split's descriptions
    assert clip_run.best_metrics["R@10"] > 100 * 10 / 150  # above chance among the val gallery's images
    for run in (clip_run, pic2word_run):
        losses = _losses(run)
        assert sum(losses[-8:]) < sum(losses[:8]), losses
    p2w_log = json.loads((pic2word_run.out_dir / "train_log.json").read_text())
    assert p2w_log["head"] == "pic2word" and set(p2w_log["history"][0]["baselines"]) == {"image_only", "text_only", "sum"}
    # the mapping net alone trained: the towers are the CLIP's, weight for weight
    clip, p2w = load_checkpoint(clip_run.best_checkpoint).model, load_checkpoint(pic2word_run.best_checkpoint).model
    for (name, before), after in zip(clip.backbone.state_dict().items(), p2w.backbone.state_dict().values(), strict=True):
        assert torch.equal(before, after), name
    result = evaluate_path(pic2word_run.best_checkpoint, data=synth_data, split="test", progress=False)
    assert list(result.reports) == ["composed", "image_only", "text_only", "sum"]
    assert "| image + text |" in result.format()


def test_zero_shot_eval_reads_its_prompt_template(pic2word_run, synth_data: Path) -> None:
    default = evaluate_path(pic2word_run.best_checkpoint, data=synth_data, split="val", progress=False, baselines=False)
    other = evaluate_path(pic2word_run.best_checkpoint, data=synth_data, split="val", progress=False, baselines=False,
                          template="{modification} , a photo of *")
    assert default.reports["composed"].metrics != other.reports["composed"].metrics
    assert compir_main(["eval", str(pic2word_run.best_checkpoint), "--data", str(synth_data), "--template", "a photo"]) == 2


def test_sum_baseline_on_a_supervised_checkpoint_is_the_normalised_sum(clip_run, synth_data: Path) -> None:
    from compir.train.evaluation import encode_split

    result = evaluate_path(clip_run.best_checkpoint, data=synth_data, split="val", progress=False, sum_baseline=True)
    assert list(result.reports) == ["composed", "image_only", "text_only", "sum"]
    assert list(evaluate_path(clip_run.best_checkpoint, data=synth_data, split="val", progress=False).reports) == [
        "composed", "image_only", "text_only"]
    split = load_split(synth_data, split="val")
    encoded = encode_split(load_checkpoint(clip_run.best_checkpoint).model, split, progress=False)
    both = encoded.queries["image_only"] + encoded.queries["text_only"]
    torch.testing.assert_close(torch.from_numpy(encoded.queries["sum"]), torch.nn.functional.normalize(torch.from_numpy(both), dim=-1))


def _csv(folder: Path, split_root: Path, rows: int, *, separator: str = "\t", keys: tuple[str, str] = ("filepath", "title")) -> Path:
    """open_clip's CSV of ``rows`` synthetic training images and their descriptions (images copied beside it,
    paths relative to the CSV's folder but the first, which is absolute)."""
    split = load_split(split_root, split="train")
    names = [name for name in split.gallery if split.captions.get(name)][:rows]
    (folder / "img").mkdir(parents=True)
    lines = [separator.join(keys)]
    for index, name in enumerate(names):
        shutil.copy(split.image_path(name), folder / "img" / f"{name}.png")
        path = str(folder / "img" / f"{name}.png") if index == 0 else f"img/{name}.png"
        lines.append(separator.join([path, split.captions[name][0]]))
    path = folder / "pairs.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_clip_objective_trains_on_an_open_clip_csv(synth_data: Path, tmp_path: Path) -> None:
    csv = _csv(tmp_path / "data", synth_data, 60, separator=",", keys=("image", "caption"))
    out = tmp_path / "run"
    assert compir_main(["train", "--data", str(csv.parent), "--objective", "clip", "--model", "micro", "--out", str(out),
                        "--csv-img-key", "image", "--csv-caption-key", "caption", "--csv-separator", ",", "--epochs", "1",
                        "--steps-per-epoch", "2", "--batch-size", "8", "--amp", "off", "--workers", "0", "--no-progress"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["objective"] == "clip" and set(log["history"][0]["metrics"]) == {"R@1", "R@5", "R@10"}
    assert load_checkpoint(out / "best.pt").config.head == "combiner"


def test_val_csv_and_a_tab_separated_csv(synth_data: Path, tmp_path: Path) -> None:
    train_csv, val_csv = _csv(tmp_path / "train", synth_data, 20), _csv(tmp_path / "val", synth_data, 12)
    result = train(TrainOptions(data=train_csv, out_dir=tmp_path / "run", objective="clip", val_csv=val_csv, epochs=1,
                                steps_per_epoch=1, **{**FAST, "batch_size": 8}))  # type: ignore[arg-type]
    assert set(result.best_metrics) == {"R@1", "R@5", "R@10"}
    for value in result.best_metrics.values():  # validated on the 12 pairs of --val-csv, not on held-out rows
        assert abs(value * 12 / 100 - round(value * 12 / 100)) < 1e-6, result.best_metrics


def _refused(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str], *expected: str) -> None:
    assert compir_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(text in err for text in expected), err
    assert not out.exists(), "a refused input wrote a run folder"


@pytest.mark.parametrize(("problem", "expected"), [
    ("empty caption", ("row 4", "caption", "missing or empty")),
    ("short row", ("row 3", "caption", "missing or empty")),
    ("missing image", ("row 5", "does not exist")),
    ("not an image", ("row 2", "does not decode")),
])
def test_bad_csv_rows_are_refused_naming_file_and_row(problem: str, expected: tuple[str, ...], synth_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    csv = _csv(tmp_path / "data", synth_data, 50)
    lines = csv.read_text(encoding="utf-8").splitlines()
    if problem == "empty caption":
        lines[3] = lines[3].split("\t")[0] + "\t   "
    elif problem == "short row":
        lines[2] = lines[2].split("\t")[0]
    elif problem == "missing image":
        lines[4] = "img/no-such.png\t" + lines[4].split("\t")[1]
    else:
        Path(lines[1].split("\t")[0]).write_text("not a png", encoding="utf-8")
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    _refused(["train", "--data", str(csv), "--objective", "clip", "--model", "micro", "--out", str(out)], out, capsys,
             str(csv), *expected)


def test_folders_without_a_csv_or_without_images_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here", encoding="utf-8")
    out = tmp_path / "run"
    _refused(["train", "--data", str(empty), "--objective", "clip", "--model", "micro", "--out", str(out)], out, capsys,
             str(empty), "no CSV")
    _refused(["train", "--data", str(empty), "--head", "pic2word", "--model", "micro", "--out", str(out)], out, capsys,
             str(empty), "no images")


def test_a_truncated_image_met_in_training_names_its_file_and_row(synth_data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    csv = _csv(tmp_path / "data", synth_data, 50)
    broken = tmp_path / "data" / "img" / "broken.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(broken, quality=95)
    broken.write_bytes(broken.read_bytes()[:400])  # the header opens; the pixels do not decode
    lines = csv.read_text(encoding="utf-8").splitlines()
    lines[6] = "img/broken.jpg\t" + lines[6].split("\t")[1]
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # 50 rows, 2 held out: one batch of the 48 others holds the broken one
    assert compir_main(["train", "--data", str(csv), "--objective", "clip", "--model", "micro", "--out", str(tmp_path / "run"),
                        "--epochs", "1", "--batch-size", "48", "--workers", "1", "--amp", "off", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{csv} row 7" in err and "broken.jpg" in err, err


def test_objective_clip_refuses_heads_it_cannot_train(synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _refused(["train", "--data", str(synth_data), "--objective", "clip", "--head", "pic2word", "--out", str(out)], out, capsys,
             "freezes")
    _refused(["train", "--data", str(synth_data), "--objective", "clip", "--head", "tgcir", "--out", str(out)], out, capsys,
             "--head combiner")


def test_the_images_only_batch_holds_pixels_and_nothing_else(synth_data: Path) -> None:
    assert [f.name for f in dataclasses.fields(ImageBatch)] == ["pixel_values"]
    from compir.data.synthetic import synth_config_of
    from compir.train.config import configure_model, resolve_model_config
    from compir.train.model import CIRModel

    model = CIRModel(configure_model(resolve_model_config("micro"), head="pic2word"))
    scenes = SceneSource(synth_config_of(synth_data), preprocess=model.preprocess, tokenizer=None, batch_size=4,
                         steps_per_epoch=2, seed=0)
    batches = list(scenes.epoch(0))
    assert len(batches) == 2 and all(type(b) is ImageBatch and b.pixel_values.shape == (4, 3, 32, 32) for b in batches)
    photos = sorted((synth_data / "images").rglob("*.png"))[:8]
    files = FileSource(photos, where=[str(p) for p in photos], captions=None, preprocess=model.preprocess,
                       tokenizer=model.tokenizer, batch_size=4, seed=0, workers=0)
    assert all(type(b) is ImageBatch for b in files.epoch(0))


def test_pic2word_trains_on_a_photo_folder_and_on_a_dataset_with_garbage_triplets(synth_data: Path, tmp_path: Path) -> None:
    # A photo folder: the dataset's files without dataset.json and any caption: every image under it, recursively.
    photos = tmp_path / "photos"
    shutil.copytree(synth_data / "images", photos / "nested")
    result = train(TrainOptions(data=photos, out_dir=tmp_path / "photos-run", head="pic2word", epochs=1, steps_per_epoch=3, **FAST))  # type: ignore[arg-type]
    assert set(result.best_metrics) == {"inversion_loss"} and result.best_metrics["inversion_loss"] > 0
    # A CIRR-layout dataset whose training triplets are garbage: the head reads its image list only.
    cirr = tmp_path / "cirr"
    shutil.copytree(synth_data, cirr)
    (cirr / "dataset.json").unlink()
    (cirr / "captions" / "cap.rc2.train.json").write_text("{ garbage", encoding="utf-8")
    with pytest.raises(DatasetError):
        load_split(cirr, split="train")
    result = train(TrainOptions(data=cirr, out_dir=tmp_path / "cirr-run", head="pic2word", epochs=1, steps_per_epoch=3, **FAST))  # type: ignore[arg-type]
    assert "R@1" in result.best_metrics  # validated on the val split's triplets, composed through the prompt


@pytest.fixture(scope="module")
def hf_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers", reason="HF text towers need transformers")
    from tests.fixtures.text_towers import build_text_tower, build_tokenizer

    root = tmp_path_factory.mktemp("hf")
    text_cfg = {"hf_model_name": str(build_text_tower(root / "tower", "bert")), "hf_pooler_type": "cls_pooler",
                "hf_tokenizer_name": str(build_tokenizer(root / "tokenizer", "bert")), "hf_proj_type": "linear", "context_length": 24}
    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
    config = {"open_clip": {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text_cfg},
              "head": {"name": "combiner", "projection_dim": 64, "hidden_dim": 64}, "loss_weights": {"composed": 1.0}}
    path = root / "hf.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_an_hf_text_tower_trains_the_clip_objective_and_is_refused_by_pic2word_in_one_line(
        hf_config: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clip"
    assert compir_main(["train", "--data", str(synth_data), "--objective", "clip", "--model", str(hf_config), "--out", str(out),
                        "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--amp", "off", "--val-queries", "16",
                        "--no-progress"]) == 0
    assert set(json.loads((out / "train_log.json").read_text())["history"][0]["metrics"]) == {"R@1", "R@5", "R@10"}
    refused = tmp_path / "p2w"
    _refused(["train", "--data", str(synth_data), "--init", str(out / "best.pt"), "--head", "pic2word", "--out", str(refused)],
             refused, capsys, "textual inversion", "TextTransformer")
