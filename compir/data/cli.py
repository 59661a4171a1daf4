"""``compir data``: render the synthetic benchmark, inspect and check datasets."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Sequence

from compir.data.files import check_images
from compir.data.load import FORMATS, load_split
from compir.data.synth import SynthConfig
from compir.data.synth_write import write_synthetic

EPILOG = """examples:
  compir data synth --out data/synth                      # default size (~40k training queries)
  compir data synth --out /tmp/s --n-train 2000 --n-test 400 --seed 3
  compir data info data/synth --split test               # counts of any supported dataset
  compir data check /datasets/cirr --split val           # every image exists and decodes
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir data",
        description="Render compir's synthetic benchmark; inspect and check CIRR / FashionIQ / Shoes / synthetic data.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = SynthConfig()
    synth = commands.add_parser(
        "synth",
        help="render the synthetic benchmark (CIRR layout)",
        description="Render compir's CSS-like benchmark: 3x3 scenes of shapes, add / remove / change / move "
        "queries, val / test references with their siblings in the gallery, held-out (shape, colour) pairs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument("--out", required=True, help="output folder (created atomically)")
    synth.add_argument("--seed", type=int, default=0, help="same seed and sizes -> same bytes (default 0)")
    synth.add_argument("--n-train", type=int, default=defaults.n_train, help=f"training queries (default {defaults.n_train})")
    synth.add_argument("--n-val", type=int, default=defaults.n_val, help=f"validation queries (default {defaults.n_val})")
    synth.add_argument("--n-test", type=int, default=defaults.n_test, help=f"test queries (default {defaults.n_test})")
    synth.add_argument("--image-size", type=int, default=defaults.image_size, help=f"image side in pixels (default {defaults.image_size})")
    synth.add_argument("--siblings", type=int, default=defaults.edits_per_reference - 1,
                       help="val / test: other edits of each reference whose targets are in the gallery")
    synth.add_argument("--workers", type=int, default=None, help="render processes (default: CPU count)")
    synth.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    for name, help_text in (("info", "print a split's counts"), ("check", "check that every image exists and decodes")):
        sub = commands.add_parser(name, help=help_text, description=f"{help_text[0].upper()}{help_text[1:]} (CIRR, FashionIQ, Shoes "
                                  "or the synthetic benchmark; the layout is detected unless --format says).",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("root", help="dataset root folder")
        sub.add_argument("--split", required=True)
        sub.add_argument("--format", dest="fmt", choices=FORMATS, default="auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "synth":
        try:
            config = SynthConfig(
                n_train=args.n_train,
                n_val=args.n_val,
                n_test=args.n_test,
                image_size=args.image_size,
                edits_per_reference=args.siblings + 1,
            )
        except ValueError as exc:
            parser.error(str(exc))
        start = time.perf_counter()
        summary = write_synthetic(args.out, seed=args.seed, config=config, workers=args.workers, overwrite=args.overwrite)
        elapsed = time.perf_counter() - start
        for split_name, counts in summary.counts.items():
            print(f"{split_name}: " + ", ".join(f"{key} {value}" for key, value in counts.items()))
        print(f"wrote {summary.n_images} images to {summary.root} in {elapsed:.1f} s")
        return 0
    split = load_split(args.root, split=args.split, fmt=args.fmt)
    if args.command == "info":
        print(f"{split.name}: protocol {split.protocol}, {len(split.queries)} queries, {len(split.gallery)} gallery images")
        for label, counter in (("kind", Counter(q.kind for q in split.queries if q.kind)),
                               ("group", Counter(q.group for q in split.queries if q.group)),
                               ("unseen", Counter(str(q.unseen) for q in split.queries if q.unseen is not None))):
            if counter:
                print(f"  {label}: " + ", ".join(f"{key} {value}" for key, value in sorted(counter.items())))
        return 0
    problems = check_images(split)
    for problem in problems:
        print(f"{problem.path}: {problem.problem}")
    print(f"{split.name}: {len(problems)} bad image(s)")
    return 1 if problems else 0
