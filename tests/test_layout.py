"""The package layout and its import rules."""

from __future__ import annotations

import subprocess
import sys

from compir.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name}" in out


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "compir", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_core_modules_import_without_torch():
    code = (
        "import sys, compir, compir.cli, compir.contracts, compir.manifest, compir.images, compir.data.types\n"
        "bad = [m for m in ('torch', 'open_clip', 'gradio', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
