"""``compir train``: train a composed retrieval model on a dataset folder."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from compir.train.config import DEFAULT_MODEL, list_model_configs

EPILOG = """examples:
  compir train --data data/synth --out runs/tiny --minutes 10
  compir train --data data/synth --model micro --epochs 2 --batch-size 64
  compir train --data data/synth --out runs/repro --steps 400 --amp off    # reproducible: a fixed step count
  compir train --data data/cirr --model ViT-B-32 --pretrained openai --freeze-image --lr 1e-4
  compir train --data data/synth --out runs/tiny --resume runs/tiny/last.pt --minutes 10
  torchrun --nproc_per_node 2 -m compir train --data data/synth --out runs/ddp --epochs 2

The run folder gets best.pt (best validation score), last.pt (with optimizer state, for
--resume) and train_log.json. Synthetic data is re-rendered fresh every epoch; real datasets
(CIRR, FashionIQ, Shoes) are read from disk.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir train",
        description="Train a composed image retrieval model (open_clip backbone + composition head).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset root (synthetic, CIRR, FashionIQ or Shoes)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in config ({', '.join(list_model_configs())}), a config JSON file, or an open_clip model name (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/train"), help="run folder (default: %(default)s)")
    parser.add_argument("--pretrained", help="open_clip pretrained tag (downloads) or a local open_clip weights file")
    parser.add_argument("--epochs", type=int, help="number of epochs (default: 10, or as many as --minutes allows)")
    parser.add_argument("--minutes", type=float, help="wall-clock budget; the learning-rate schedule spans it")
    parser.add_argument("--steps", type=int, help="train exactly this many steps (reproducible; the schedule spans them)")
    parser.add_argument("--batch-size", type=int, default=128, help="per process (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=40)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off")
    parser.add_argument("--backbone-lr-scale", type=float, default=1.0, help="backbone rate = lr x this (e.g. 0.1 with --pretrained)")
    parser.add_argument("--resume", type=Path, help="continue from a checkpoint (weights, optimizer, step, schedule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freeze-image", action="store_true", help="do not train the image tower")
    parser.add_argument("--freeze-text", action="store_true", help="do not train the text tower")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="mixed precision; auto (default) takes bf16 only where a timed probe finds it faster than fp32 (GPU: bf16 or fp16)")
    parser.add_argument("--steps-per-epoch", type=int, help="synthetic data: steps between validations")
    parser.add_argument("--siblings", type=int, help="synthetic data: edits of one reference per batch (hard negatives)")
    parser.add_argument("--val-split", default="val", help="split to validate on every epoch (default: %(default)s)")
    parser.add_argument("--val-queries", type=int, help="validate on the first N queries only")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes for real datasets")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--format", dest="data_format", default="auto", help="dataset format (default: detect)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from compir.train.loop import TrainOptions, train

    options = TrainOptions(
        data=args.data, out_dir=args.out, model=args.model, pretrained=args.pretrained, epochs=args.epochs,
        minutes=args.minutes, steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, backbone_lr_scale=args.backbone_lr_scale,
        seed=args.seed, resume=args.resume, freeze_image=args.freeze_image, freeze_text=args.freeze_text,
        amp=args.amp, steps_per_epoch=args.steps_per_epoch, siblings=args.siblings, val_split=args.val_split,
        val_queries=args.val_queries, workers=args.workers, device=args.device, data_format=args.data_format,
        progress=not args.no_progress,
    )
    result = train(options)
    if result.history:  # rank 0
        print(f"best checkpoint: {result.best_checkpoint}  ({json.dumps({k: round(v, 2) for k, v in result.best_metrics.items()})})")
        print(f"last checkpoint: {result.last_checkpoint}  ({result.steps} steps, {result.epochs} epochs, "
              f"{result.seconds / 60:.1f} min, {result.steps_per_second:.2f} steps/s)")
    return 0
