"""``compir import``: turn checkpoints trained elsewhere into compir checkpoints."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

EPILOG = """examples:
  compir import clip4cir --clip tuned_clip_best.pt --combiner combiner.pt --model RN50x4 --out runs/clip4cir/best.pt
  compir export onnx runs/clip4cir/best.pt --out exports/clip4cir
  compir index build exports/clip4cir --images gallery/ --out indexes/clip4cir
  compir serve exports/clip4cir indexes/clip4cir --port 8000

The files are CLIP4Cir's own (Baldrati et al.): {'CLIP': state_dict} and {'Combiner': state_dict}.
The checkpoint gets their form of the combiner (raw CLIP features, text-then-image concatenation),
QuickGELU, and their preprocessing (--transform, --target-ratio: as they trained).
"""

# Mirrors compir.train.clip4cir (not imported here, so `--help` needs no torch).
_TRANSFORMS = ("targetpad", "squarepad", "clip")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir import", description="Import checkpoints trained elsewhere.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    clip4cir = commands.add_parser(
        "clip4cir", help="CLIP4Cir's fine-tuned CLIP + Combiner files -> a compir checkpoint",
        description="Turn CLIP4Cir's released files (its fine-tuned CLIP and its Combiner) into a compir checkpoint that "
        "compir eval, export onnx and the runtime take like one trained here.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    clip4cir.add_argument("--clip", type=Path, required=True, help="their fine-tuned CLIP file ({'CLIP': state_dict})")
    clip4cir.add_argument("--combiner", type=Path, required=True, help="their Combiner file ({'Combiner': state_dict})")
    clip4cir.add_argument("--model", required=True, help="the CLIP it was trained with: an open_clip name (RN50x4, RN50, ViT-B-32) "
                                                         "or a compir model config JSON")
    clip4cir.add_argument("--out", type=Path, required=True, help="compir checkpoint to write")
    clip4cir.add_argument("--transform", choices=_TRANSFORMS, default="targetpad",
                          help="their preprocessing: targetpad (default, as released), squarepad, clip")
    clip4cir.add_argument("--target-ratio", type=float, default=1.25, help="targetpad's ratio (default: %(default)s, as released)")
    clip4cir.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from compir.train.clip4cir import import_clip4cir

    imported = import_clip4cir(
        clip_path=args.clip, combiner_path=args.combiner, model=args.model, out=args.out,
        transform=args.transform, target_ratio=args.target_ratio, overwrite=args.overwrite,
    )
    pre = imported.config.preprocess_spec()
    print(f"wrote {imported.path}: {imported.config.name}, combiner projection {imported.projection_dim}, "
          f"hidden {imported.hidden_dim}, preprocess {pre.resize_mode}"
          f"{f' {pre.target_ratio:g}' if pre.target_ratio is not None else ''} at {pre.image_size} px")
    print(f"next: compir export onnx {imported.path} --out exports/clip4cir")
    return 0
