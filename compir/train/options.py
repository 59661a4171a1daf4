"""The options of a training run, declared once: :class:`TrainOptions` is what :func:`compir.train.loop.train`
takes, and ``compir train`` builds its flags from it (:func:`compir.train.cli.build_parser`).

Each field becomes ``--kebab-case`` (``batch_size`` -> ``--batch-size``; a ``flag`` in its metadata renames it),
its type comes from the annotation (``int | None`` -> an optional int), its help text from :func:`cli` metadata. A
boolean that defaults to True is turned off by ``--no-<name>``; a ``tuple[str, ...]`` is a repeatable flag. A field
added here gets its flag with no other change. Torch-free, so ``compir train --help`` answers at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compir.manifest import RESIZE_MODES
from compir.train.config import DEFAULT_MODEL, list_model_configs

AMP_MODES = ("auto", "bf16", "fp16", "off")
OBJECTIVES = ("cir", "clip")  # composed retrieval on triplets; CLIP's contrastive objective on image-caption pairs


def cli(help: str, *, flag: str | None = None, choices: Sequence[str] | None = None) -> dict[str, Any]:
    """Field metadata for ``compir train``: the help text (argparse's ``%(default)s`` works; for a boolean
    that defaults to True it describes ``--no-<name>``), a flag name other than ``--kebab-case``, choices."""
    return {"help": help, "flag": flag, "choices": choices}


@dataclass(frozen=True)
class TrainOptions:
    """Everything a run depends on (recorded in ``train_log.json``)."""

    data: Path = field(metadata=cli(
        "dataset root (synthetic, CIRR, FashionIQ or Shoes); --objective clip: also open_clip's CSV (or its folder); "
        "a zero-shot head (--head pic2word): also a plain folder of photos"))
    out_dir: Path = field(default=Path("runs/train"), metadata=cli("run folder (default: %(default)s)", flag="--out"))
    model: str = field(default=DEFAULT_MODEL, metadata=cli(
        f"built-in config ({', '.join(list_model_configs())}), a config JSON file, or an open_clip model name (default: %(default)s)"))
    pretrained: str | None = field(default=None, metadata=cli(
        "open_clip pretrained tag (downloads) or a local weights file (open_clip's, or OpenAI's TorchScript .pt); "
        "the activation follows the weights (QuickGELU for OpenAI's)"))
    head: str | None = field(default=None, metadata=cli(
        "composition head on the model's backbone: combiner, tgcir, or pic2word (zero-shot: trains a mapping net on images only, "
        "towers frozen) (default: the model config's; combiner for an open_clip name)"))
    head_option: tuple[str, ...] = field(default=(), metadata=cli(
        "KEY=VALUE head option, repeatable (e.g. --head-option form=clip4cir --head-option stage=clip); unknown keys are refused"))
    resize_mode: str | None = field(default=None, metadata=cli(
        "image preprocessing (default: the model config's, else shortest); targetpad is CLIP4Cir's", choices=RESIZE_MODES))
    objective: str = field(default="cir", metadata=cli(
        "cir: composed retrieval on triplets (default); clip: CLIP's symmetric contrastive loss on image-caption pairs "
        "(open_clip's CSV or the synthetic benchmark's scene descriptions), no triplet used", choices=OBJECTIVES))
    csv_img_key: str = field(default="filepath", metadata=cli("--objective clip: the CSV's image path column (default: %(default)s)"))
    csv_caption_key: str = field(default="title", metadata=cli("--objective clip: the CSV's caption column (default: %(default)s)"))
    csv_separator: str = field(default="\t", metadata=cli("--objective clip: the CSV's separator (default: tab; e.g. ',')"))
    val_csv: Path | None = field(default=None, metadata=cli(
        "--objective clip: validation pairs in the same CSV format (default: every 20th row of DATA's CSV is held out)"))
    init: Path | None = field(default=None, metadata=cli(
        "start from this compir checkpoint's weights and model config (fresh optimizer and schedule; --head / --head-option "
        "apply on top): e.g. CLIP4Cir's stage 2 after stage 1, or fine-tuning an imported checkpoint"))
    epochs: int | None = field(default=None, metadata=cli("number of epochs (default: 10, or as many as --minutes / --steps allow)"))
    minutes: float | None = field(default=None, metadata=cli(
        "wall-clock budget for the whole run (training + validation); the learning-rate schedule spans it"))
    steps: int | None = field(default=None, metadata=cli(
        "train exactly this many optimizer steps (reproducible on any machine); the schedule spans them"))
    expected_steps: int | None = field(default=None, metadata=cli(
        "steps the recipe was tuned for: with --minutes, warn early when this machine's budget gives far fewer"))
    batch_size: int = field(default=128, metadata=cli("per process (default: %(default)s)"))
    lr: float = field(default=1e-3, metadata=cli("peak learning rate (default: %(default)s)"))
    weight_decay: float = field(default=0.1, metadata=cli("AdamW weight decay (default: %(default)s)"))
    warmup_steps: int = field(default=40, metadata=cli("linear warmup steps before the cosine decay (default: %(default)s)"))
    grad_clip: float = field(default=1.0, metadata=cli("max gradient norm, 0 = off (default: %(default)s)"))
    backbone_lr_scale: float = field(default=1.0, metadata=cli("backbone rate = lr x this (e.g. 0.1 with --pretrained)"))
    seed: int = field(default=0, metadata=cli("random seed (default: %(default)s)"))
    resume: Path | None = field(default=None, metadata=cli("continue from a checkpoint (weights, optimizer, step, schedule)"))
    optimizer_state: bool = field(default=True, metadata=cli(
        "last.pt without AdamW's state: last.pt otherwise holds two moment buffers per weight (3x best.pt, e.g. 6.15 GB for "
        "ViT-L-14) so that --resume continues exactly; without it --resume restarts the moments at zero"))
    freeze_image: bool = field(default=False, metadata=cli("do not train the image tower"))
    freeze_text: bool = field(default=False, metadata=cli("do not train the text tower"))
    amp: str = field(default="auto", metadata=cli(
        "mixed precision; auto (default): bf16 only where a timed probe and the model's first steps find it faster than fp32 "
        "(GPU: bf16 or fp16)", choices=AMP_MODES))
    steps_per_epoch: int | None = field(default=None, metadata=cli(
        "steps between validations (default: synthetic data = train split size / batch; real data = one pass)"))
    siblings: int | None = field(default=None, metadata=cli("synthetic data: edits of one reference per batch (hard negatives)"))
    val_split: str = field(default="val", metadata=cli("split to validate on every epoch (default: %(default)s)"))
    val_queries: int | None = field(default=None, metadata=cli("validate on the first N queries only"))
    workers: int = field(default=2, metadata=cli("data loading processes for real datasets (default: %(default)s)"))
    device: str = field(default="auto", metadata=cli("auto, cpu, cuda, cuda:1 ..."))
    data_format: str = field(default="auto", metadata=cli("dataset format (default: detect)", flag="--format"))
    progress: bool = field(default=True, metadata=cli("no progress bars"))
