"""The package layout and its import rules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from compir.cli import COMMANDS, build_parser, main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name}" in out


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_no_arguments_prints_the_usage_and_exits_2():
    # As argparse tools do: `compir` alone is a usage error (it exited 0 before).
    result = subprocess.run([sys.executable, "-m", "compir"], capture_output=True, text=True, check=False)
    assert result.returncode == 2, result
    assert "usage: compir <command>" in result.stderr and not result.stdout


def test_every_command_exposes_the_parser_its_main_uses():
    # The docs' test parses documented command lines with these: each must be the stage's own parser.
    for name in COMMANDS:
        parser = build_parser(name)
        assert parser.prog == f"compir {name}", (name, parser.prog)
    assert build_parser("index").parse_args(["build", "EXPORT", "--images", "photos", "--out", "idx"]).out == "idx"


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


# ---- import arrows, checked statically (every import, lazy ones included; TYPE_CHECKING-only ones excepted) ----
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# Front ends and model code sit above the runtime; the HTTP service is a front end (compir/service).
RUNTIME_MUST_NOT_IMPORT = (
    "compir.train", "compir.export", "compir.demo", "compir.service",
    "torch", "open_clip", "gradio",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Dotted targets of every import in ``path`` (``from a import b`` -> ``a.b``), relative ones resolved."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue  # annotations only: no import at run time
            if isinstance(child, ast.Import):
                found.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[: len(package) - child.level + 1] + ([base] if base else []))
                found.extend(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _under(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def _runtime_files() -> list[Path]:
    return sorted((PACKAGE_ROOT / "compir" / "runtime").rglob("*.py"))


def test_runtime_imports_no_model_code_and_no_front_end():
    bad = [
        f"{_module_name(path)} imports {target}"
        for path in _runtime_files()
        for target in _imports(path)
        if any(_under(target, banned) for banned in RUNTIME_MUST_NOT_IMPORT)
    ]
    assert not bad, bad


def test_metrics_sit_below_the_data_package():
    bad = [target for target in _imports(PACKAGE_ROOT / "compir" / "metrics.py") if _under(target, "compir.data")]
    assert not bad, f"compir.metrics imports {bad}; compir.data's readers and baselines import the metrics"


def test_no_import_cycle_between_runtime_modules():
    modules = {_module_name(path): path for path in _runtime_files()}

    def resolve(target: str) -> str | None:  # "compir.runtime.rerank.Reranker" -> "compir.runtime.rerank"
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {name: {m for t in _imports(path) if (m := resolve(t)) and m != name} for name, path in modules.items()}
    state: dict[str, str] = {}  # "open" while on the depth-first path, "done" after

    def cycle_from(name: str, path: list[str]) -> list[str] | None:
        path, state[name] = path + [name], "open"
        for nxt in sorted(edges[name]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := cycle_from(nxt, path)):
                return found
        state[name] = "done"
        return None

    for name in sorted(modules):
        if name not in state:
            cycle = cycle_from(name, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_package_imports_nothing_from_tests():
    """compir and benchmarks ship in the wheel, tests/ does not: nothing they import may live there."""
    files = sorted((PACKAGE_ROOT / "compir").rglob("*.py")) + sorted((PACKAGE_ROOT / "benchmarks").rglob("*.py"))
    bad = [f"{_module_name(path)} imports {target}" for path in files for target in _imports(path) if _under(target, "tests")]
    assert not bad, bad


# `compir bench coverage` from an installed package: tests/ cannot be imported, the stand-ins are built all the same.
_STANDINS_WITHOUT_TESTS = """
import sys
from pathlib import Path

class _NoTests:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tests":
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: an installed compir has no tests/)")
        return None

sys.meta_path.insert(0, _NoTests())
import open_clip
from benchmarks.bench_coverage import build_standins, standin_label, substitute_standins, shrink
standins = build_standins(Path({folder!r}))
arch = shrink(open_clip.get_model_config("xlm-roberta-base-ViT-B-32"))
assert standin_label(arch) == "stand-in xlm-roberta tokenizer + xlm-roberta tower", standin_label(arch)
substitute_standins(arch, standins)
assert Path(arch["text_cfg"]["hf_tokenizer_name"], "tokenizer.json").is_file()
print("stand-ins built:", len(standins))
"""


def test_bench_coverage_builds_its_standins_without_the_tests_folder(tmp_path):
    code = _STANDINS_WITHOUT_TESTS.format(folder=str(tmp_path / "standins"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stand-ins built: 11" in result.stdout
