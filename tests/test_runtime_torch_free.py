"""The runtime never imports torch, open_clip, gradio or onnx: proved in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_CODE = """
import importlib, pkgutil, sys
import compir.runtime
names = [m.name for m in pkgutil.walk_packages(compir.runtime.__path__, "compir.runtime.")
         if not m.name.startswith("compir.runtime.service")]  # the HTTP service has its own test
for name in names:
    importlib.import_module(name)
from compir.runtime.retriever import Retriever
retriever = Retriever.from_dirs({export!r}, {index!r}, providers=["cpu"])
item = retriever.item_ids()[0]
assert retriever.search(reference_id=item, text="make it red", k=3)
assert retriever.search(reference_image=str(retriever.item_image_path(item)), text="make it red", k=3)
assert retriever.search(text="a red circle", k=3)
from compir.runtime.search_cli import main
assert main([{export!r}, {index!r}, "--reference-id", item, "--text", "bigger", "--json"]) == 0
banned = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "gradio", "onnx", "torchvision"))
assert not banned, banned
print("modules:", len(names))
"""


def test_runtime_imports_and_searches_without_torch(tiny_export: Path, tiny_index: Path) -> None:
    code = _CODE.format(export=str(tiny_export), index=str(tiny_index))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split("modules:")[1]) >= 15
