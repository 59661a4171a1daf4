"""The training loop: run folder, recall above the baselines, resume, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from compir.train.checkpoint import load_checkpoint
from compir.train.cli import main
from compir.train.loop import TrainOptions, train


def test_fixture_run_writes_best_last_and_log(tiny_run, tiny_checkpoint):
    folder = tiny_run.out_dir
    assert tiny_checkpoint == folder / "best.pt" and (folder / "last.pt").is_file()
    log = json.loads((folder / "train_log.json").read_text())
    assert log["options"]["model"] == "micro" and len(log["history"]) == tiny_run.epochs == 1
    losses = log["losses"]  # the weighted training loss of every step: finite, and falling as the model learns
    assert len(losses) == 150 and all(loss == loss and abs(loss) < 1e6 for loss in losses)
    assert sum(losses[-20:]) < sum(losses[:20])
    last = load_checkpoint(folder / "last.pt")
    assert last.step == tiny_run.steps == 150 and last.optimizer_state and "optimizer" in last.optimizer_state
    assert (folder / "last.pt").stat().st_size > 2.5 * tiny_checkpoint.stat().st_size  # AdamW's two moments per weight
    assert load_checkpoint(tiny_checkpoint).optimizer_state is None  # best.pt: weights only


def test_fixture_model_beats_chance_and_both_baselines(tiny_run):
    entry = tiny_run.history[-1]
    composed, baselines = entry["metrics"], entry["baselines"]
    assert composed["R@10"] >= 60.0, composed
    assert composed["R@1"] > baselines["image_only"]["R@1"] + 5, entry
    assert composed["R@1"] > baselines["text_only"]["R@1"] + 5, entry


def test_resume_continues_step_schedule_and_history(tiny_run, synth_data, tmp_path):
    # 2 epochs x 76 steps = 152: the run picks up after epoch 1 at step 150 and trains 2 more steps.
    result = train(TrainOptions(
        data=synth_data, out_dir=tmp_path / "resumed", resume=tiny_run.last_checkpoint, epochs=2,
        steps_per_epoch=76, batch_size=32, lr=2e-3, warmup_steps=15, val_queries=40, progress=False,
    ))
    assert (result.epochs, result.steps) == (2, 152)
    resumed = load_checkpoint(result.last_checkpoint)
    assert [h["epoch"] for h in resumed.optimizer_state["history"]] == [1, 2]
    assert resumed.optimizer_state["optimizer"]["state"], "optimizer moments were not carried over"


def test_cli_trains_and_reports(synth_data, tmp_path, capsys):
    code = main([
        "--data", str(synth_data), "--model", "micro", "--out", str(tmp_path / "cli"), "--epochs", "1",
        "--steps-per-epoch", "2", "--batch-size", "16", "--val-queries", "16", "--no-progress", "--amp", "off",
        "--no-optimizer-state",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "best checkpoint:" in out and (tmp_path / "cli" / "best.pt").is_file()
    # --no-optimizer-state: last.pt keeps the loop state for --resume but not AdamW's moments (best.pt's size).
    last = load_checkpoint(tmp_path / "cli" / "last.pt")
    assert last.optimizer_state is not None and "optimizer" not in last.optimizer_state and last.optimizer_state["history"]
    assert (tmp_path / "cli" / "last.pt").stat().st_size < 1.2 * (tmp_path / "cli" / "best.pt").stat().st_size


def test_frozen_tower_does_not_change(synth_data, tmp_path):
    result = train(TrainOptions(
        data=synth_data, out_dir=tmp_path / "frozen", model="micro", epochs=1, steps_per_epoch=2, batch_size=16,
        val_queries=16, freeze_image=True, progress=False,
    ))
    trained = load_checkpoint(result.last_checkpoint).model
    torch.manual_seed(0)  # the run's seed: the same initial weights
    from compir.train.config import resolve_model_config
    from compir.train.model import CIRModel

    initial = CIRModel(resolve_model_config("micro"))
    trained_weights = trained.backbone.visual.state_dict().values()
    for (name, before), after in zip(initial.backbone.visual.state_dict().items(), trained_weights, strict=True):
        assert torch.equal(before, after), name
    assert not torch.equal(initial.head.gate[0].weight, trained.head.gate[0].weight)


def test_bad_amp_mode_is_an_input_error(synth_data, tmp_path):
    from compir.errors import InputError

    with pytest.raises(InputError, match="amp"):
        train(TrainOptions(data=synth_data, out_dir=tmp_path / "x", amp="fp8"))


def test_real_dataset_trains_from_files_on_disk(synth_data, tmp_path):
    # The synthetic folder is valid CIRR: read as "cirr", it trains from its PNG files through
    # the DataLoader path (open_clip's train transform) instead of rendering fresh scenes.
    result = train(TrainOptions(
        data=synth_data, data_format="cirr", out_dir=tmp_path / "cirr", model="micro", epochs=1, steps_per_epoch=2,
        batch_size=8, workers=0, val_queries=16, progress=False,
    ))
    assert result.steps == 2 and result.history[0]["metrics"]["R@1"] >= 0.0
    assert load_checkpoint(result.best_checkpoint).step == 2


def test_fixed_step_count_trains_exactly_that_many_steps_and_reports_throughput(synth_data, tmp_path, capsys):
    code = main([
        "--data", str(synth_data), "--model", "micro", "--out", str(tmp_path / "steps"), "--steps", "12",
        "--steps-per-epoch", "5", "--batch-size", "8", "--val-queries", "8", "--no-progress", "--amp", "auto",
    ])
    assert code == 0
    out = capsys.readouterr().out
    last = load_checkpoint(tmp_path / "steps" / "last.pt")
    assert last.step == 12 and last.epoch == 3  # 5 + 5 + 2: the last epoch stops at the step count
    assert "precision: auto: " in out  # the decision and its measured reason
    assert "throughput: " in out and "steps/s" in out


def test_invalid_step_count_is_refused(synth_data, tmp_path):
    from compir.errors import InputError

    with pytest.raises(InputError, match="--steps must be >= 1"):
        train(TrainOptions(data=synth_data, out_dir=tmp_path / "bad", model="micro", steps=0, progress=False))
