"""The README's Python snippet runs as written on what ``compir quickstart`` writes (its export and
index folders, here the session's tiny ones in their place), torch-free, in a fresh interpreter."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from compir.quickstart import DEFAULT_OUT

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, "the README's Python API section has no python block"
    return match.group(1)


def test_the_python_snippet_runs_on_the_quickstart_output(tiny_export: Path, tiny_index: Path, tmp_path: Path) -> None:
    snippet = _python_snippet()
    # The quickstart writes its export and index to DEFAULT_OUT/export and DEFAULT_OUT/index
    # (tests/test_quickstart.py checks those folders); the snippet must name them.
    export, index = f"{DEFAULT_OUT.as_posix()}/export", f"{DEFAULT_OUT.as_posix()}/index"
    assert f'"{export}"' in snippet and f'"{index}"' in snippet
    out = tmp_path / DEFAULT_OUT
    shutil.copytree(tiny_export, out / "export")
    shutil.copytree(tiny_index, out / "index")  # the snippet adds an item and saves
    code = snippet + (
        "\nbanned = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'gradio'))"
        "\nassert not banned, banned"
        "\nassert 'my-photo' in Retriever.from_dirs(" + repr(export) + ", " + repr(index) + ").item_ids()"
    )
    result = subprocess.run([sys.executable, "-c", "import sys\n" + code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the snippet prints its best hit"
    # Run twice, as a reader may: replace=True makes the add repeatable.
    again = subprocess.run([sys.executable, "-c", "import sys\n" + code], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
