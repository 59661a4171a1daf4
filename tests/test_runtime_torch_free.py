"""The runtime never imports torch, open_clip, gradio or onnx: proved in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_CODE = """
import importlib, pkgutil, sys
import compir.runtime
names = [m.name for m in pkgutil.walk_packages(compir.runtime.__path__, "compir.runtime.")]
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


# Engine building needs only the runtime's dependencies plus TensorRT: torch, onnx and open_clip are
# made unimportable (as on a Jetson without them) before anything of compir is imported.
_ENGINE_CODE = """
import contextlib, io, sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "open_clip", "torchvision", "onnxscript"):
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocked())
from compir.cli import main
help_text = io.StringIO()
with contextlib.redirect_stdout(help_text):
    try:
        main(["export", "engine", "--help"])
    except SystemExit as done:
        assert done.code == 0, done.code
assert "--precision" in help_text.getvalue() and "TF32 off" in help_text.getvalue()
import compir.export.trt.engine_build as build
import compir.export.trt.profiles
import compir.runtime.backends.providers
from compir.manifest import load_manifest
manifest = load_manifest({export!r})
tokens = compir.export.trt.profiles.token_range(manifest.tokenizer.context_length)
profile = compir.export.trt.profiles.compute_profile(manifest.graph("query_encoder"), min_batch=1, opt_batch=8, max_batch=64, tokens=tokens)
assert set(profile) == {{"pixel_values", "input_ids"}}
assert build.precision_flags("fp32").disable == ("TF32",)
errors = io.StringIO()
with contextlib.redirect_stderr(errors):
    code = main(["export", "engine", {export!r}, "--precision", "fp16"])
assert code == 2, code
with_trt = "tensorrt" in sys.modules or "TensorRT is not installed" in errors.getvalue() or "no CUDA driver" in errors.getvalue()
assert with_trt, errors.getvalue()
print("engine builder ok")
"""


def test_engine_builder_imports_and_runs_without_torch_or_onnx(tiny_export: Path) -> None:
    code = _ENGINE_CODE.format(export=str(tiny_export))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engine builder ok" in result.stdout
