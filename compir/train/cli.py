"""``compir train``: train a composed retrieval model on a dataset folder."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compir.train.options import TrainOptions

EPILOG = """examples:
  compir train --data data/synth --out runs/tiny --minutes 10
  compir train --data data/synth --model micro --epochs 2 --batch-size 64
  compir train --data data/synth --out runs/repro --steps 400 --amp off
  compir train --data data/cirr --model ViT-B-32 --pretrained openai --freeze-image --lr 1e-4
  compir train --data data/cirr --model ViT-B-32 --head tgcir --head-option local_tokens=8
  CLIP4Cir's two stages (their combiner form, target-pad; they used --lr 2e-6, then 2e-5 for the combiner on frozen towers):
  compir train --data fiq --model RN50x4 --pretrained openai --resize-mode targetpad --head-option form=clip4cir --head-option stage=clip
  compir train --data fiq --init runs/train/best.pt --head-option stage=combiner --out runs/stage2
  compir train --data data/synth --out runs/tiny --resume runs/tiny/last.pt --minutes 10
  torchrun --nproc_per_node 2 -m compir train --data data/synth --out runs/ddp --epochs 2

Zero-shot composition, no triplet: a CLIP trained on image-caption pairs (open_clip's CSV, or the
synthetic benchmark's scene descriptions), then Pic2Word's mapping net on images alone (towers frozen;
DATA may be a plain folder of photos):
  compir train --data data/synth --objective clip --out runs/clip --minutes 10
  compir train --data catalog/pairs.csv --objective clip --model ViT-B-32 --pretrained openai --lr 1e-5 --csv-separator ,
  compir train --data data/synth --init runs/clip/best.pt --head pic2word --out runs/pic2word --minutes 2
  compir train --data photos/ --model ViT-B-32 --pretrained openai --head pic2word --out runs/pic2word

A model config with a "train" entry (tgcir-fashioniq, tgcir-cirr, tgcir-shoes: the paper's
recipes) sets --lr, --backbone-lr-scale, --weight-decay and --batch-size unless given:
  compir train --data /datasets/fashioniq --model tgcir-fashioniq --pretrained openai

The run folder gets best.pt (best validation score, weights only), last.pt (with AdamW's state
for an exact --resume: 3x the size of best.pt; --no-optimizer-state leaves it out) and
train_log.json. Synthetic data is re-rendered fresh every epoch; real datasets (CIRR, FashionIQ,
Shoes) are read from disk.
"""


def build_parser() -> argparse.ArgumentParser:
    """``compir train``'s flags, one per :class:`TrainOptions` field (see :mod:`compir.train.options`)."""
    parser = argparse.ArgumentParser(
        prog="compir train",
        description="Train a composed image retrieval model (open_clip backbone + composition head).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_option_flags(parser, TrainOptions)
    return parser


def add_option_flags(parser: argparse.ArgumentParser, options: type[Any]) -> None:
    """A flag per field of the dataclass ``options``, its value under ``args.<field name>``."""
    hints = typing.get_type_hints(options)
    for spec in dataclasses.fields(options):
        _add_flag(parser, spec, hints[spec.name])


def _add_flag(parser: argparse.ArgumentParser, spec: dataclasses.Field[Any], hint: Any) -> None:
    meta = spec.metadata
    flag = meta.get("flag") or "--" + spec.name.replace("_", "-")
    kwargs: dict[str, Any] = {"dest": spec.name, "help": meta.get("help")}
    if spec.default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = spec.default
    parts = typing.get_args(hint)
    kind = next(p for p in parts if p is not type(None)) if len(parts) == 2 and type(None) in parts else hint  # X | None -> X
    choices = meta.get("choices")
    if typing.get_origin(kind) is typing.Literal:  # Literal["a", "b"] -> choices a, b
        choices, kind = typing.get_args(kind), type(typing.get_args(kind)[0])
    if typing.get_origin(kind) is tuple and typing.get_args(kind) == (str, Ellipsis):  # a repeatable flag
        kwargs.update(action=_Append, metavar=flag.lstrip("-").replace("-", "_").upper())
    elif kind is bool:
        if spec.default is True:  # on unless --no-<name>
            flag = meta.get("flag") or "--no-" + spec.name.replace("_", "-")
            kwargs["action"] = "store_false"
        else:
            kwargs["action"] = "store_true"
    elif kind in (str, int, float, Path):
        kwargs["type"] = kind
        if choices:
            kwargs["choices"] = tuple(choices)
        else:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
    else:
        raise TypeError(
            f"option {spec.name!r}: no flag for type {hint!r} (use bool, str, int, float, Path, Literal, tuple[str, ...] or X | None)"
        )
    parser.add_argument(flag, **kwargs)


class _Append(argparse.Action):
    """argparse's "append" into a tuple, so a repeatable flag's parsed default equals the dataclass's ``()``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        setattr(namespace, self.dest, (*getattr(namespace, self.dest, ()), values))


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The ``dest`` of every option the command line gives explicitly (whatever its value)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return set(vars(probe.parse_args(argv)))


def with_recipe_settings(options: TrainOptions, given: set[str]) -> TrainOptions:
    """``options`` with the model config's ``train`` settings (lr, weight decay, ...) where no flag gave them."""
    if options.resume is not None:
        return options
    from compir.train.config import resolve_model_config

    recipe = {name: value for name, value in resolve_model_config(options.model).train.items() if name not in given}
    if not recipe:
        return options
    types = typing.get_type_hints(TrainOptions)
    print(f"recipe settings of {options.model}: " + ", ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in recipe.items()))
    return dataclasses.replace(options, **{name: types[name](value) for name, value in recipe.items()})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from compir.train.loop import train

    options = TrainOptions(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(TrainOptions)})
    result = train(with_recipe_settings(options, given_flags(parser, argv)))
    if result.history:  # rank 0
        print(f"best checkpoint: {result.best_checkpoint}  ({json.dumps({k: round(v, 2) for k, v in result.best_metrics.items()})})")
        print(f"last checkpoint: {result.last_checkpoint}  ({result.steps} steps, {result.epochs} epochs, "
              f"{result.seconds / 60:.1f} min, {result.steps_per_second:.2f} steps/s)")
    return 0
