"""Every shell and Python block in README.md and docs/*.md runs here, or says why it cannot.

Marker convention (follow it when you add a section to the README or to docs/):

- The test collects every fenced block tagged ``bash``, ``sh`` or ``python``. Blocks tagged otherwise
  (``text``, ``json``, none) are output or data and are not collected.
- A block without a marker RUNS, as written, in a fresh temporary folder laid out as ``compir
  quickstart`` leaves its output folder, filled with the session's tiny fixtures (tests/fixtures/):
  ``compir-quickstart/data`` (the synthetic dataset), ``compir-quickstart/run/best.pt``,
  ``compir-quickstart/export`` and ``compir-quickstart/index`` (copies: blocks may add items).
  ``compir`` is this interpreter's; ``curl`` fails on an HTTP error status. Shell blocks run under ``bash -euo pipefail``; Python blocks run
  twice (a reader may) in a fresh interpreter, and one that imports ``compir.runtime`` or
  ``compir.service`` must not import torch, open_clip or gradio.
- ``<!-- doc-test: skip REASON -->`` on the line right above the opening fence: the block does not run
  here. REASON is one of:
    ``gpu``      needs an NVIDIA GPU, TensorRT or a Jetson;
    ``cluster``  needs a Milvus server or a Ray cluster;
    ``network``  downloads (packages, weights, a git clone);
    ``long``     minutes of CPU (training, the whole test suite, benchmarks).
  A skipped shell block is still checked: every command in it that runs ``compir SUBCOMMAND ...``
  (also ``python -m compir ...`` and ``torchrun ... -m compir ...``) is parsed by that subcommand's own
  argparse parser (``compir.cli.build_parser``), so a renamed or removed flag fails here. A skipped
  Python block must still compile.
- ``<!-- doc-test: server -->``: the block's first command starts a server that runs until stopped
  (``compir serve``, ``compir demo``). The test starts it in the background, waits until its port
  answers, runs the rest of the block against it, then stops it. The port (the command's ``--port``,
  else its parser's default) is replaced by a free one, in the command and in the rest of the block.
- A block repeated verbatim (the README's command again on its docs page) runs once.
- Write placeholders as UPPERCASE words (``EXPORT_DIR``), not ``<...>``, so skipped lines still parse.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from compir.cli import COMMANDS, build_parser
from compir.quickstart import DEFAULT_OUT
from tests.fixtures.service import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_REASONS = ("gpu", "cluster", "network", "long")
RUN_TAGS = ("bash", "sh", "python")
_FENCE = re.compile(r"^```([\w-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
_BANNED = ("torch", "open_clip", "gradio")


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it is, its language, its marker ("" = run it) and its text."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"

    @property
    def shell(self) -> bool:
        return self.lang in ("bash", "sh")


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file with the ``doc-test`` marker right above it; ValueError
    for a marker that is unknown or not right above a fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        marker = _MARKER.match(lines[index])
        if marker:
            value = marker.group(1)
            if value != "server" and not (value.startswith("skip ") and value[5:] in SKIP_REASONS):
                raise ValueError(f"{path.name}:{index + 1}: unknown doc-test marker {value!r}; "
                                 f"use 'server' or 'skip ' + one of {', '.join(SKIP_REASONS)}")
            below = _FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
            if not below or not below.group(1):
                raise ValueError(f"{path.name}:{index + 1}: a doc-test marker must be the line right above a tagged code fence")
        fence = _FENCE.match(lines[index])
        if fence and fence.group(1):
            end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"{path.name}:{index + 1}: code fence never closed")
            above = _MARKER.match(lines[index - 1]) if index else None
            blocks.append(Block(path, index + 1, fence.group(1), above.group(1) if above else "", "\n".join(lines[index + 1 : end]) + "\n"))
            index = end
        index += 1
    return blocks


ALL_BLOCKS = [block for doc in DOCS for block in read_blocks(doc)]
CODE_BLOCKS = [block for block in ALL_BLOCKS if block.lang in RUN_TAGS]
# A block repeated verbatim on another page (the README's command on its docs page) runs once.
_UNIQUE = list({(b.lang, b.marker, b.code): b for b in reversed(CODE_BLOCKS)}.values())[::-1]


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, as argument lists (comments and line continuations removed;
    split at ``&&``, ``||``, ``;`` and ``|``; leading ``VAR=value`` assignments dropped)."""
    out: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        current: list[str] = []
        for token in [*shlex.split(line, comments=True), ";"]:
            if token not in (";", "&&", "||", "|", "&"):
                current.append(token)
                continue
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                current.pop(0)
            if current:
                out.append(current)
            current = []
    return out


def compir_argv(command: list[str]) -> list[str] | None:
    """``[SUBCOMMAND, args...]`` if the command runs compir (``compir``, ``python -m compir``, ``torchrun ... -m compir``)."""
    if command[0] == "compir":
        return command[1:]
    for i in range(len(command) - 1):
        if command[i] == "-m" and command[i + 1] == "compir":
            return command[i + 2 :]
    return None


def parse_error(argv: list[str]) -> str | None:
    """None if ``compir`` accepts ``argv`` (parsed by the subcommand's own parser), else argparse's message."""
    if not argv or argv[0] in ("-h", "--help", "-V", "--version"):
        return None
    if argv[0] not in COMMANDS:
        return f"unknown command {argv[0]!r}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser(argv[0]).parse_args(argv[1:])
    except SystemExit as exit_:
        if exit_.code:
            return (stderr.getvalue().strip().splitlines() or [f"exit {exit_.code}"])[-1]
    return None


# --- running blocks ------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path, synth_data: Path, tiny_checkpoint: Path, tiny_export: Path, tiny_index: Path) -> Path:
    """A folder laid out as ``compir quickstart``'s output, with a ``bin/compir`` of this interpreter."""
    out = tmp_path / DEFAULT_OUT
    (out / "run").mkdir(parents=True)
    (out / "data").symlink_to(synth_data, target_is_directory=True)
    (out / "run" / "best.pt").symlink_to(tiny_checkpoint)
    shutil.copytree(tiny_export, out / "export")
    shutil.copytree(tiny_index, out / "index")
    # curl as the blocks' reader would notice a failure: an HTTP error fails the block (and shows its body).
    (tmp_path / ".curlrc").write_text("fail-with-body\nsilent\nshow-error\n", encoding="utf-8")
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "compir").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m compir "$@"\n', encoding="utf-8")
    (bin_dir / "compir").chmod(0o755)
    return tmp_path


def _env(workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{workspace / '.bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    env["CURL_HOME"] = str(workspace)
    return env


def _run(args: list[str], workspace: Path, *, what: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=workspace, env=_env(workspace), capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _run_python(block: Block, workspace: Path) -> None:
    code = block.code
    if re.search(r"\bcompir\.(runtime|service)\b", code):
        code += f"\nimport sys\nbanned = sorted(m for m in sys.modules if m.split('.')[0] in {_BANNED!r})\nassert not banned, banned\n"
    for attempt in ("first run", "second run"):
        _run([sys.executable, "-c", code], workspace, what=f"{block.name} ({attempt})")



def _run_server_block(block: Block, workspace: Path) -> None:
    first, _, rest = block.code.strip().partition("\n")
    argv = compir_argv(shlex.split(first, comments=True))
    assert argv, f"{block.name}: a server block starts with a compir command"
    documented = build_parser(argv[0]).parse_args(argv[1:]).port  # the block's --port, else the command's default
    port = free_port()
    command = re.sub(rf"--port[ =]{documented}\b", f"--port {port}", first.split("#")[0])
    command += "" if "--port" in first else f" --port {port}"
    log = workspace / "server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(["bash", "-c", "exec " + command], cwd=workspace, env=_env(workspace), stdout=sink,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"{block.name}: the server exited ({server.returncode}):\n{log.read_text()[-3000:]}"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, f"{block.name}: the server did not listen within 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        if rest.strip():
            script = re.sub(rf"(?<=:){documented}\b", str(port), rest)
            try:
                _run(["bash", "-euo", "pipefail", "-c", script], workspace, what=block.name)
            except AssertionError as failure:
                raise AssertionError(f"{failure}\nserver log:\n{log.read_text()[-3000:]}") from None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.parametrize("block", [b for b in _UNIQUE if not b.marker.startswith("skip")], ids=lambda b: b.name)
def test_block_runs(block: Block, workspace: Path) -> None:
    if block.marker == "server":
        _run_server_block(block, workspace)
    elif block.shell:
        _run(["bash", "-euo", "pipefail", "-c", block.code], workspace, what=block.name)
    else:
        _run_python(block, workspace)


@pytest.mark.parametrize("block", [b for b in CODE_BLOCKS if b.marker.startswith("skip")], ids=lambda b: b.name)
def test_skipped_block_parses(block: Block) -> None:
    if not block.shell:
        compile(block.code, block.name, "exec")
        return
    errors = [f"{shlex.join(argv)}: {error}" for command in commands(block.code)
              if (argv := compir_argv(command)) is not None and (error := parse_error(argv)) is not None]
    assert not errors, f"{block.name} ({block.marker}): " + "; ".join(errors)


# --- what the rest of the project relies on ------------------------------------------------------


def test_markers_sit_on_code_blocks_only() -> None:
    for block in ALL_BLOCKS:
        assert not block.marker or block.lang in RUN_TAGS, f"{block.name}: a doc-test marker on a ```{block.lang} block"
    assert any(b.marker == "" for b in CODE_BLOCKS) and any(b.marker.startswith("skip") for b in CODE_BLOCKS)


def test_the_parser_check_catches_a_renamed_flag() -> None:
    # What makes the skipped blocks' check worth having: a flag that no longer exists is reported.
    assert parse_error(["index", "build", "EXPORT", "--images", "photos", "--out", "idx"]) is None
    assert "--pictures" in (parse_error(["index", "build", "EXPORT", "--images", "photos", "--out", "idx", "--pictures", "p"]) or "")
    assert "--images" in (parse_error(["index", "build", "EXPORT", "--out", "idx"]) or "")
    assert parse_error(["frobnicate"]) == "unknown command 'frobnicate'"
    [[*argv]] = [compir_argv(c) for c in commands("torchrun --nproc_per_node 2 -m compir train --data D \\\n  --out R  # comment\n")]
    assert argv == ["train", "--data", "D", "--out", "R"]
    assert parse_error(argv) is None


def test_readme_keeps_what_ci_runs_and_the_quickstart_folders() -> None:
    # .ci/run installs and tests exactly as the README says; the next steps use the quickstart's own folders.
    readme_code = "".join(b.code for b in CODE_BLOCKS if b.path.name == "README.md")
    for line in ('pip install -e ".[all]"', "python -m pytest", "mypy && ruff check compir benchmarks tests"):
        assert line in readme_code, line
    for folder in ("export", "index", "data"):
        assert f"{DEFAULT_OUT.as_posix()}/{folder}" in readme_code


def test_relative_links_resolve() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" not in target and not target.startswith("mailto:"):
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
