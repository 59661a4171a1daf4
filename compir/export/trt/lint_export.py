"""The TensorRT parser lint over an export folder: every graph of every variant, each against the
optimization profile ``compir export engine`` would build for it; and the release rules that fit
the TensorRT installed here (read from package metadata: TensorRT itself is not imported)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from pathlib import Path

from compir.engines import DEFAULT_BATCHES, ShapeRange, compute_profile, token_range
from compir.errors import ContractError
from compir.export.trt.lint import Finding, lint_graph
from compir.export.trt.parser_rules import load_rules, version_key
from compir.manifest import ExportManifest, load_manifest

# The variants engines are built from: the float graphs and the symmetric int8 Q/DQ graph.
# int8-dynamic (DynamicQuantizeLinear / MatMulInteger) and int8-static-u8 (u8 Q/DQ with non-zero
# zero points) are onnxruntime-CPU variants; the lint still lists what TensorRT would refuse in them.
TENSORRT_VARIANTS = ("fp32", "fp16", "int8-static")
_TENSORRT_PACKAGES = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_lean")

LintResult = dict[str, dict[str, list[Finding]]]  # variant -> graph role -> findings


def lint_export(
    export_dir: str | Path,
    *,
    manifest: ExportManifest | None = None,
    variants: Sequence[str] | None = None,
    releases: Sequence[str] | None = None,
    batches: tuple[int, int, int] = DEFAULT_BATCHES,
) -> LintResult:
    """Lint every graph of ``variants`` (default: all the manifest has) against the profile built
    from the manifest's shapes with ``batches`` (min, opt, max) and the tokenizer's token range."""
    folder = Path(export_dir)
    manifest = manifest or load_manifest(folder)
    result: LintResult = {}
    for name in variants or list(manifest.variants):
        spec = manifest.variant(name)
        result[name] = {}
        for role, graph in spec.graphs.items():
            profile: dict[str, ShapeRange] | None
            try:
                low, opt, high = batches
                tokens = token_range(manifest.tokenizer.context_length)
                profile = compute_profile(graph, min_batch=low, opt_batch=opt, max_batch=high, tokens=tokens)
            except ContractError:
                profile = None  # an axis no profile can size: the lint's dynamic-shape rule names it
            result[name][role] = lint_graph(folder / graph.file, profile=profile, releases=releases)
    return result


def blocking(result: LintResult) -> list[str]:
    """One line per finding in a variant that engines are built from (``variant/role: ...``)."""
    return [f"{variant}/{role}: {f.line()}" for variant, roles in result.items() if variant in TENSORRT_VARIANTS
            for role, findings in roles.items() for f in findings]


def summary_lines(result: LintResult) -> list[str]:
    """What ``compir export onnx`` prints: a warning per finding of a TensorRT variant, one line per
    onnxruntime-only variant with the ops TensorRT refuses in it, and one line when all is clean."""
    lines = [f"warning: TensorRT lint: {line}" for line in blocking(result)]
    for variant, roles in result.items():
        if variant in TENSORRT_VARIANTS:
            continue
        ops = sorted({f"{f.op} ({f.rule})" for findings in roles.values() for f in findings})
        if ops:
            lines.append(f"TensorRT lint: {variant} is an onnxruntime variant, not for engines ({', '.join(ops)}); "
                         f"build engines from {' or '.join(TENSORRT_VARIANTS)}")
    checked = [v for v in result if v in TENSORRT_VARIANTS]
    if checked and not blocking(result):
        rules = load_rules()
        lines.append(f"TensorRT lint: {', '.join(checked)} parse on TensorRT {', '.join(rules.releases)} "
                     f"(onnx-tensorrt operator matrix read {rules.read_on})")
    return lines


def installed_release(rules_releases: Mapping[str, object] | None = None) -> str | None:
    """The recorded release whose rules fit the TensorRT installed here (the newest recorded one not
    after it), from package metadata; None when no TensorRT package is installed."""
    recorded = sorted(rules_releases or load_rules().releases, key=version_key)
    for package in _TENSORRT_PACKAGES:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        fitting = [r for r in recorded if version_key(r) <= version_key(version)]
        return fitting[-1] if fitting else recorded[0]
    return None


def check_graphs(graphs: Mapping[str, Path], profiles: Mapping[str, Mapping[str, ShapeRange]], *, release: str | None) -> None:
    """ContractError listing every finding of ``graphs`` (role -> .onnx) for ``release`` (all recorded
    releases when None): ``compir export engine`` calls it before TensorRT is imported."""
    releases = [release] if release is not None else None
    lines = [f"{role}: {finding.line()}" for role, path in graphs.items()
             for finding in lint_graph(path, profile=profiles.get(role), releases=releases)]
    if lines:
        raise ContractError(
            f"TensorRT's ONNX parser would refuse {len(lines)} node(s) (compir's lint, rules in "
            f"compir/export/trt/parser_rules.json); build from {', '.join(TENSORRT_VARIANTS)} at the default opset, "
            "or pass --no-trt-lint if your TensorRT parses them:\n  " + "\n  ".join(lines)
        )
