"""``compir export``: ONNX graphs + manifest from a checkpoint; TensorRT engines from an export."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from compir.engines import DEFAULT_BATCHES, PRECISIONS
from compir.errors import ContractError, InputError
from compir.manifest import EXTERNAL_DATA_BYTES, ExportManifest

EPILOG = """examples:
  compir export onnx runs/tiny/best.pt --out exports/tiny
  compir export onnx runs/tiny/best.pt --out exports/tiny --variants fp32,int8-static \\
      --calibration-data data/synth --eval-data data/synth --overwrite
  compir export onnx runs/vitl/best.pt --out exports/vitl --variants fp32,int8-dynamic --fused
  compir export onnx runs/tiny/best.pt --out exports/tiny-ext --external-data-mb 0   (every graph with external data)
  compir export onnx runs/tiny/best.pt --out exports/tiny-trt --variants fp32,fp16,int8-static --strict-trt
  compir export onnx runs/p2w/best.pt --out exports/p2w --prompt-template "a photo of * that {modification}"   (zero-shot)
  compir export engine exports/tiny --precision fp16 --opt-batch 8 --max-batch 64 --timing-cache trt.cache
  compir export engine exports/tiny --precision int8 --variant int8-static   (on the Jetson itself; needs no torch)
  compir export engine exports/tiny --precision int8 --calibration-data data/synth   (calibrates: needs CUDA torch)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir export",
        description="Export a checkpoint to ONNX (checked against torch), or build TensorRT engines from an export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    onnx = commands.add_parser(
        "onnx", help="ONNX graphs, variants and manifest.json",
        description="Export a compir checkpoint to an export folder: ONNX graphs (image encoder, text encoder, composer, "
        "or for a zero-shot pic2word checkpoint token mapper and prompt encoder; fp32 checked against torch), "
        "reduced-precision variants (fp16, int8), the tokenizer's vocabulary and manifest.json, "
        "the only contract the torch-free runtime reads.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    onnx.add_argument("checkpoint", type=Path, help="a compir checkpoint (compir train's best.pt)")
    onnx.add_argument("--out", type=Path, required=True, help="export folder to create")
    onnx.add_argument(
        "--variants", default="fp32,fp16,int8-dynamic,int8-static,int8-static-u8",
        help="comma-separated: fp32,fp16,int8-dynamic,int8-static,int8-static-u8 (default: all; int8-static-u8: onnxruntime CPU's "
        "fastest for convolution towers, int8-static: TensorRT's)",
    )
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    onnx.add_argument(
        "--calibration-data", type=Path, default=None,
        help="dataset root or image folder for parity and int8 calibration (default: rendered scenes)",
    )
    onnx.add_argument("--calibration-count", type=int, default=64, help="calibration images / texts (default 64)")
    onnx.add_argument("--eval-data", type=Path, default=None, help="dataset root: record each variant's recall and its drop vs fp32")
    onnx.add_argument("--eval-split", default="test", help="split of --eval-data (default test)")
    onnx.add_argument("--tolerance", type=float, default=1e-4, help="fp32 parity: max abs difference to torch (default 1e-4)")
    onnx.add_argument(
        "--fused", action="store_true",
        help="also write the fused query_encoder graph (image + text encoder + composer in one; as big as the model; "
        "the runtime runs the split graphs and does not need it)",
    )
    onnx.add_argument(
        "--external-data-mb", type=float, default=EXTERNAL_DATA_BYTES / 2**20,
        help="graphs whose weights exceed this many MiB keep them in <role>.onnx.data beside the graph (ONNX external data, "
        "checksummed in the manifest; protobuf caps a graph file at 2 GiB); default %(default).0f",
    )
    onnx.add_argument(
        "--prompt-template", default=None, metavar="T",
        help="zero-shot (pic2word) exports: the prompt the text tower reads, with the placeholder word * once (the "
        "reference's token) and {modification} (the query's text) at most once; default 'a photo of * , {modification}'. "
        "The runtime can change it at query time",
    )
    onnx.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    onnx.add_argument(
        "--strict-trt", action="store_true",
        help="fail (exit 2, nothing written) when TensorRT's ONNX parser would refuse a node of the fp32, fp16 or int8-static "
        "graphs (compir's lint of onnx-tensorrt's operator matrix); without it each finding is a warning",
    )

    engine = commands.add_parser(
        "engine", help="TensorRT engines + engines.json (run on the serving GPU)",
        description="Build TensorRT engines from an export folder's ONNX graphs, on the GPU that will serve them (an engine "
        "runs only on the TensorRT version and GPU architecture that built it), and record them in engines.json. "
        "Needs TensorRT 10 and an NVIDIA GPU; no torch unless int8 is calibrated from fp32.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    engine.add_argument("export_dir", type=Path, help="an export folder (compir export onnx)")
    engine.add_argument("--precision", choices=PRECISIONS, default="fp16", help="fp32 (strict: TF32 off), fp16 (default) or int8")
    engine.add_argument("--variant", default=None, help="ONNX variant to parse (default fp32; int8-static for explicit int8)")
    engine.add_argument("--min-batch", type=int, default=DEFAULT_BATCHES[0])
    engine.add_argument("--opt-batch", type=int, default=DEFAULT_BATCHES[1])
    engine.add_argument("--max-batch", type=int, default=DEFAULT_BATCHES[2])
    engine.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace memory pool (GiB)")
    engine.add_argument("--timing-cache", type=Path, default=None, help="timing cache file, loaded if present and saved after the build")
    engine.add_argument(
        "--calibration-data", type=Path, default=None, help="int8 from fp32: dataset root or image folder (default: rendered scenes)"
    )
    engine.add_argument("--out", type=Path, default=None, help="engine folder (default EXPORT_DIR/engines, where the runtime looks)")
    engine.add_argument(
        "--no-trt-lint", action="store_true",
        help="build even when compir's lint says TensorRT's parser refuses a node (the lint runs before TensorRT is loaded)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "onnx":
        return _onnx(args)
    return _engine(args)


def _onnx(args: argparse.Namespace) -> int:
    from compir.export.to_onnx import export_onnx

    manifest = export_onnx(
        args.checkpoint,
        out_dir=args.out,
        variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        calibration_data=args.calibration_data,
        calibration_count=args.calibration_count,
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        opset=args.opset,
        tolerance=args.tolerance,
        fused=args.fused,
        external_data_bytes=_mebibytes(args.external_data_mb),
        overwrite=args.overwrite,
        prompt_template=args.prompt_template,
        before_publish=partial(_lint, strict=args.strict_trt),
    )
    print(f"wrote {args.out} (embed dim {manifest.embed_dim}, opset {manifest.opset})")
    if manifest.zero_shot:
        spec = manifest.composition_spec
        print(f"zero-shot ({spec.kind}): prompt template {spec.prompt_template!r}, placeholder {spec.placeholder!r} "
              f"(token id {spec.placeholder_id})")
    print("| variant | recipe | worst parity | R@10 | R@10 drop | query cos to fp32 |")
    print("|---|---|---:|---:|---:|---:|")
    for variant in manifest.variants.values():
        worst = max(variant.parity.values()) if variant.name == "fp32" else min(variant.parity.values())
        acc = variant.accuracy
        cells = [_cell(acc, "R@10", "{:.2f}"), _cell(acc, "recall_at_10_drop", "{:+.2f}"), _cell(acc, "mean_cosine_to_fp32", "{:.5f}")]
        recipe = variant.quantization.get("recipe", "-")
        print(f"| {variant.name} | {recipe} | {worst:.3g} | " + " | ".join(cells) + " |")
    _print_rerankers(Path(args.out), manifest)
    return 0


def _lint(folder: Path, manifest: ExportManifest, *, strict: bool) -> None:
    """TensorRT's parser over every graph before the export is published: warnings, or with
    ``--strict-trt`` an error for a finding in a variant engines are built from."""
    from compir.export.trt.lint_export import blocking, lint_export, summary_lines

    result = lint_export(folder, manifest=manifest)
    if strict and blocking(result):
        lines = blocking(result)
        raise ContractError(f"--strict-trt: TensorRT's ONNX parser would refuse {len(lines)} node(s); nothing was written:\n  "
                            + "\n  ".join(lines))
    for line in summary_lines(result):
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)


def _print_rerankers(folder: Path, manifest: ExportManifest) -> None:
    """One line per stage-2 re-ranker the export carries: its validated weight, or why it does not run."""
    from compir.runtime.rerankers.settings import reranker_settings

    for name, settings in reranker_settings(folder, manifest).items():
        weight = float(settings.get("weight", 0.0))
        if weight > 0:
            print(f"re-ranker {name}: weight {weight:g} (chosen on validation)")
        else:
            left_out = "; left out of the export with its graph and image regions" if settings.get("left_out") else ""
            print(f"re-ranker {name}: validation chose weight 0, so the runtime does not apply it{left_out}")


def _mebibytes(value: float) -> int:
    if value < 0:
        raise InputError(f"--external-data-mb must be >= 0, got {value:g}")
    return int(value * 2**20)


def _cell(figures: dict[str, float], key: str, fmt: str) -> str:
    return fmt.format(figures[key]) if key in figures else "-"


def _engine(args: argparse.Namespace) -> int:
    from compir.export.trt.engine_build import BuildOptions, build_engines, device_summary

    variant = args.variant or "fp32"
    options = BuildOptions(
        precision=args.precision,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_gb=args.workspace_gb,
        timing_cache=args.timing_cache,
        trt_lint=not args.no_trt_lint,
    )
    engines = build_engines(args.export_dir, options=options, variant=variant, calibration_data=args.calibration_data, out_dir=args.out)
    first = next(iter(engines.engines.values()))
    print(f"built {len(engines.engines)} {engines.precision} engine(s) from {variant} for {device_summary(first.device)}")
    for record in engines.engines.values():
        print(f"  {record.role}: {record.file} ({record.build_seconds:.1f} s)")
    return 0
