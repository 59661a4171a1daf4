"""The runtime options every runtime command takes (``search``, ``index build``, ``serve``), declared once."""

from __future__ import annotations

import argparse

from compir.runtime.backends import BACKENDS


def add_runtime_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--backend``, ``--providers`` and ``--variant``; read the providers back with :func:`providers_from`."""
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="runtime backend (default: %(default)s)")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="onnxruntime providers in order, e.g. tensorrt cuda cpu (commas also accepted)")
    parser.add_argument("--variant", default=None, help="export variant (default: the manifest's)")


def add_prompt_template_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--prompt-template``: a zero-shot export's prompt for this run's queries (``search``, ``serve``, ``demo``)."""
    parser.add_argument("--prompt-template", default=None, metavar="T",
                        help="zero-shot exports: the prompt composed queries are read in, with the placeholder word * once "
                        "(the reference) and {modification} at most once (the text); default: the export's")


def providers_from(args: argparse.Namespace) -> list[str] | None:
    """``--providers cuda cpu`` and ``--providers cuda,cpu`` both give ``["cuda", "cpu"]``; None when not given."""
    if not args.providers:
        return None
    return [name.strip() for value in args.providers for name in value.split(",") if name.strip()]
