"""Every leaf command's --help (each of compir.cli's COMMANDS, and each of their subcommands) opens with a
description and ends with an example of that very command."""

from __future__ import annotations

import contextlib
import io
import re

from compir.cli import COMMANDS, main

_SECTIONS = ("positional arguments:", "options:", "optional arguments:")


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*argv, "--help"])
        except SystemExit as done:
            assert done.code == 0, (argv, done.code)
    return out.getvalue()


def _subcommands(text: str) -> list[str]:
    """The subcommand choices in a help's usage block (``{onnx,engine} ...``; an option's choices have no ``...``)."""
    usage = text.split("\n\n", 1)[0]
    found = re.search(r"\{([\w,-]+)\} \.\.\.", usage)
    return found.group(1).split(",") if found else []


def _problems(argv: list[str], text: str) -> list[str]:
    problems = []
    blocks = [block.strip() for block in text.split("\n\n")]
    if len(blocks) < 2 or blocks[1].startswith(_SECTIONS):
        problems.append(f"compir {' '.join(argv)} --help has no description")
    examples = text.split("examples:", 1)[1] if "examples:" in text else ""
    command = "compir " + " ".join(argv)
    if not any(line.strip() == command or line.strip().startswith(command + " ") for line in examples.splitlines()):
        problems.append(f"compir {' '.join(argv)} --help has no example of `{command}`")
    return problems


def test_every_leaf_command_has_a_description_and_an_example() -> None:
    leaves, problems = [], []
    for name in COMMANDS:
        text = _help([name])
        subcommands = _subcommands(text)
        for argv, leaf_text in [([name, sub], _help([name, sub])) for sub in subcommands] or [([name], text)]:
            leaves.append(" ".join(argv))
            problems += _problems(argv, leaf_text)
    assert not problems, problems
    assert {"export onnx", "export engine", "index build", "import clip4cir", "data synth", "doctor"} <= set(leaves), leaves
