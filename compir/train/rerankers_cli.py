"""``compir rerankers``: train the stage-2 re-rankers (NEUCORE, MMRef) of a trained checkpoint.

Each is written as a sidecar beside the checkpoint (``<stem>.neucore.pt``, ``<stem>.mmref.pt``),
bound to it by sha256; ``compir export onnx`` then puts them into the export folder and the
runtime's ``rerank=True`` uses them. Their mix weights are chosen on the validation split.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from compir.train.mmref.identities import IDENTITY_SOURCES

EPILOG = """examples:
  compir rerankers runs/tiny/best.pt --data data/synth                 # both, default steps
  compir rerankers runs/tiny/best.pt --data data/synth --only mmref --steps 500
  compir rerankers runs/tiny/best.pt --data data/synth --only mmref --finetune-steps 200   # writes runs/tiny/mmref-finetuned.pt
  compir rerankers runs/cirr/best.pt --data data/cirr --only mmref --identities clusters
  compir rerankers runs/fiq/best.pt --data data/fashioniq --only neucore    # FashionIQ / CIRR / Shoes files
  compir rerankers runs/shoes/best.pt --data data/shoes --only neucore --val-split test   # Shoes has no val split
  compir rerankers runs/tiny/best.pt --data data/synth --only neucore --regions 3   # combiner: 3x3 image regions
  compir export onnx runs/tiny/best.pt --out exports/tiny              # picks up the sidecars
  compir export onnx runs/tiny/mmref-finetuned.pt --out exports/mmref  # the fine-tuned model and its MMRef sidecar
"""

KINDS = ("neucore", "mmref")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir rerankers",
        description="Train NEUCORE (concept re-ranker) and MMRef (reference refinement) for a checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="a trained compir checkpoint (best.pt)")
    parser.add_argument("--data", type=Path, required=True, help="its dataset (synthetic, FashionIQ, CIRR or Shoes layout)")
    parser.add_argument("--only", choices=KINDS, help="train just one of them")
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps each (default: %(default)s)")
    parser.add_argument("--val-queries", type=int, default=None, help="validation queries for choosing the mix weight")
    parser.add_argument("--val-split", default="val", help="split that chooses the mix weights (default: %(default)s)")
    parser.add_argument("--identities", choices=IDENTITY_SOURCES, default="auto",
                        help="MMRef's object identities: the dataset's, the synthetic scenes', k-means clusters of the training "
                             "images or CIRR's img_set groups (default: %(default)s = dataset's if any, else clusters)")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="MMRef: fine-tune the model this many steps with reference-guided learning first and write "
                             "mmref-finetuned.pt beside the checkpoint (default: %(default)s = frozen model)")
    parser.add_argument("--regions", type=int, default=2, metavar="G",
                        help="NEUCORE over a head without local tokens (the combiner): its vector plus a G x G grid of the "
                             "backbone's image tokens, cached in the index (0: the vector alone; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    if args.only in (None, "neucore"):
        from compir.train.neucore.train import train_neucore

        neucore = train_neucore(args.checkpoint, data=args.data, steps=args.steps, val_queries=args.val_queries,
                                val_split=args.val_split, regions=args.regions, seed=args.seed, progress=progress)
        print(f"neucore: {neucore.path} (mix weight {neucore.weight} chosen on val; val {neucore.val_before} -> {neucore.val_after})")
    if args.only in (None, "mmref"):
        from compir.train.mmref import train_mmref

        mmref = train_mmref(args.checkpoint, data=args.data, steps=args.steps, val_queries=args.val_queries, seed=args.seed,
                            progress=progress, identities=args.identities, finetune_steps=args.finetune_steps,
                            val_split=args.val_split)
        print(f"mmref: {mmref.path} for {mmref.checkpoint} ({mmref.references} references, weight {mmref.weight}, "
              f"temperature {mmref.temperature}; val {mmref.val_before} -> {mmref.val_after})")
    return 0
