"""The ``compir`` command: a thin dispatcher to each stage's ``main(argv)``.

Subcommand modules are imported only when chosen, so ``compir search`` on an edge device never
imports torch, and ``compir --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from compir import __version__
from compir.errors import CompirError

# name -> (module with main(argv), one-line summary, example)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quickstart": ("compir.quickstart", "data -> train -> eval -> export -> index -> one query", "compir quickstart --minutes 3"),
    "data": ("compir.data.cli", "render the synthetic benchmark, inspect datasets", "compir data synth --out data/synth"),
    "train": ("compir.train.cli", "train a composed retrieval model", "compir train --data data/synth --out runs/tiny"),
    "rerankers": (
        "compir.train.rerankers_cli", "train stage-2 re-rankers (NEUCORE, MMRef) for a checkpoint",
        "compir rerankers runs/tiny/best.pt --data data/synth",
    ),
    "import": (
        "compir.train.import_cli", "import checkpoints trained elsewhere (CLIP4Cir)",
        "compir import clip4cir --clip CLIP.pt --combiner COMBINER.pt --model RN50x4 --out runs/clip4cir/best.pt",
    ),
    "eval": ("compir.evaluate", "evaluate a checkpoint or an export folder", "compir eval runs/tiny/best.pt --data data/synth"),
    "export": ("compir.export.cli", "ONNX graphs + manifest; TensorRT engines", "compir export onnx runs/tiny/best.pt --out exports/tiny"),
    "index": (
        "compir.runtime.index_cli", "build a gallery index (usearch or Milvus)",
        "compir index build exports/tiny --images data/synth/images --out indexes/tiny",
    ),
    "search": (
        "compir.runtime.search_cli", "composed (or text-only) search",
        "compir search exports/tiny indexes/tiny --reference-image IMG --text 'make it red'",
    ),
    "serve": ("compir.service.cli", "HTTP API over the runtime", "compir serve exports/tiny indexes/tiny --port 8000"),
    "demo": ("compir.demo.cli", "Gradio demo over the runtime", "compir demo exports/tiny indexes/tiny"),
    "bench": ("benchmarks.runner", "run benchmarks, write JSON + PNG + report", "compir bench synth"),
    "doctor": (
        "compir.doctor.cli", "what this machine offers compir: extras, CPU class, GPU, TensorRT, an export's fastest variant",
        "compir doctor exports/tiny",
    ),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"compir {__version__}: composed image retrieval, from training to a torch-free runtime.",
        "",
        "usage: compir <command> [options]     (compir <command> --help for each)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary, _) in COMMANDS.items()]
    lines += ["", "examples:"]
    lines += [f"  {example}" for _, _, example in COMMANDS.values()]
    return "\n".join(lines)


def build_parser(name: str) -> argparse.ArgumentParser:
    """The argparse parser of ``compir NAME``: the one its stage's ``main`` parses with (the docs' test
    checks documented command lines against it). Imports that stage's module; KeyError for an unknown name."""
    module = importlib.import_module(COMMANDS[name][0])
    parser: argparse.ArgumentParser = module.build_parser()
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # as argparse tools do: the usage on stderr, status 2
        print(_usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name = args[0]
    if name not in COMMANDS:
        print(f"compir: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(
            f"compir {name}: needs the optional dependency {exc.name!r}; "
            f"install it with: pip install 'compir[all]' (or the extra for this stage)",
            file=sys.stderr,
        )
        return 2
    try:
        result = module.main(args[1:])
    except CompirError as exc:
        print(f"compir {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"compir {name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
