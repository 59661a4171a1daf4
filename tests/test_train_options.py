"""``compir train``'s flags come from TrainOptions: one declaration, every flag, default and example kept."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from compir.train.cli import EPILOG, add_option_flags, build_parser
from compir.train.options import TrainOptions

# Every flag `compir train` had before its parser was generated, and the values they must still give.
FLAGS = (
    "--data", "--model", "--out", "--pretrained", "--epochs", "--minutes", "--batch-size", "--lr", "--weight-decay",
    "--warmup-steps", "--grad-clip", "--backbone-lr-scale", "--resume", "--seed", "--freeze-image", "--freeze-text", "--amp",
    "--steps-per-epoch", "--siblings", "--val-split", "--val-queries", "--workers", "--device", "--format", "--no-progress",
)


def _options(argv: list[str]) -> TrainOptions:
    args = build_parser().parse_args(argv)
    return TrainOptions(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(TrainOptions)})


def test_every_field_has_its_flag_and_the_old_flags_remain():
    parser = build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert set(FLAGS) <= flags
    dests = {action.dest for action in parser._actions} - {"help"}
    assert dests == {spec.name for spec in dataclasses.fields(TrainOptions)}


def test_defaults_are_the_dataclass_defaults():
    assert _options(["--data", "d"]) == TrainOptions(data=Path("d"))
    assert _options(["--data", "d"]).out_dir == Path("runs/train") and TrainOptions(data=Path("d")).batch_size == 128


def test_flags_parse_to_typed_values():
    options = _options([
        "--data", "d", "--out", "o", "--epochs", "3", "--minutes", "1.5", "--lr", "1e-4", "--resume", "r.pt",
        "--freeze-image", "--amp", "off", "--format", "cirr", "--no-progress", "--pretrained", "openai",
    ])
    assert (options.out_dir, options.epochs, options.minutes, options.lr, options.resume) == (Path("o"), 3, 1.5, 1e-4, Path("r.pt"))
    assert (options.freeze_image, options.freeze_text, options.amp) == (True, False, "off")
    assert (options.data_format, options.progress) == ("cirr", False)
    assert options.pretrained == "openai" and options.steps_per_epoch is None


def test_bad_values_are_refused_by_the_parser(capsys):
    for argv in (["--amp", "fp8"], ["--epochs", "two"], []):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--data", "d", *argv] if argv else argv)
    assert "--data" in capsys.readouterr().err  # the last one: --data is required


def test_the_help_examples_parse():
    examples = [line.split("compir train", 1)[1] for line in EPILOG.splitlines() if "compir train" in line]
    assert len(examples) >= 5
    for example in examples:
        build_parser().parse_args(shlex.split(example))


def test_a_new_field_gets_its_flag_without_other_changes():
    @dataclasses.dataclass(frozen=True)
    class Extended(TrainOptions):
        steps: int | None = None  # no metadata at all
        compile: bool = False
        precision: Literal["fp32", "bf16"] = "fp32"

    parser = argparse.ArgumentParser()
    add_option_flags(parser, Extended)
    args = parser.parse_args(["--data", "d", "--steps", "7", "--compile", "--precision", "bf16"])
    assert (args.steps, args.compile, args.precision) == (7, True, "bf16")
    assert parser.parse_args(["--data", "d"]).steps is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "d", "--precision", "fp8"])


def test_an_unsupported_field_type_is_named():
    @dataclasses.dataclass(frozen=True)
    class Odd(TrainOptions):
        sizes: tuple[int, ...] = ()

    with pytest.raises(TypeError, match="'sizes'"):
        add_option_flags(argparse.ArgumentParser(), Odd)


def test_train_help_imports_no_torch():
    code = "import sys\nfrom compir.cli import main\nmain(['train', '--help'])\nassert 'torch' not in sys.modules, 'torch imported'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "--batch-size" in result.stdout and "compir train --data data/synth" in result.stdout


def test_head_flags_repeat_and_reach_the_model_config():
    from compir.errors import InputError
    from compir.train.config import configure_model, resolve_model_config

    options = _options(["--data", "d", "--head", "tgcir", "--head-option", "local_tokens=3", "--head-option", "hidden_dim=64",
                        "--resize-mode", "targetpad"])
    assert (options.head, options.head_option, options.resize_mode) == ("tgcir", ("local_tokens=3", "hidden_dim=64"), "targetpad")
    config = configure_model(resolve_model_config("micro"), head=options.head, head_options=options.head_option,
                             resize_mode=options.resize_mode)
    assert config.head == "tgcir" and config.head_options == {"local_tokens": 3, "hidden_dim": 64}
    assert set(config.loss_weights) == {"composed", "teacher", "mask_constraint", "distill", "ortho", "matching", "caption"}
    assert (config.preprocess_spec().resize_mode, config.preprocess_spec().target_ratio) == ("targetpad", 1.25)
    combiner = configure_model(resolve_model_config("ViT-B-32"), head_options=["form=clip4cir"])
    assert combiner.head_options == {"projection_dim": 2048, "hidden_dim": 4096, "dropout": 0.5, "form": "clip4cir"}
    assert configure_model(resolve_model_config("tiny-tgcir"), head="combiner").loss_weights == {"composed": 1.0, "caption": 0.5}
    for bad, message in ((["sizes=3"], "the combiner head has no such option; it takes projection_dim, hidden_dim, dropout"),
                         (["dropout"], "expected KEY=VALUE")):
        with pytest.raises(InputError, match=message):
            configure_model(resolve_model_config("micro"), head_options=bad)
    with pytest.raises(InputError, match="unknown composition head 'clip4cir'; available: combiner, pic2word, tgcir"):
        configure_model(resolve_model_config("micro"), head="clip4cir")


def test_head_flags_with_resume_or_init_conflicts_are_one_line_errors(tmp_path, capsys):
    from compir.cli import main

    data = ["--data", str(tmp_path)]
    for argv, message in ((["--resume", "r.pt", "--head", "tgcir"], "--resume continues a run as it was: drop --head"),
                          (["--init", "i.pt", "--pretrained", "openai"], "--init loads all weights"),
                          (["--init", "i.pt", "--model", "micro"], "--init takes the model config from the checkpoint")):
        assert main(["train", *data, *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", *data, "--model", "micro", "--head-option", "form=theirs"]) == 2
    assert "form must be one of ('compir', 'clip4cir'), got 'theirs'" in capsys.readouterr().err
