"""``compir doctor [EXPORT_DIR] [--json]``: what this machine offers compir, each missing piece with how to get it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from compir.doctor.amp import amp_section
from compir.doctor.gpu import gpu_section, onnxruntime_section, tensorrt_section
from compir.doctor.machine import cpu_section, extras_section, jetson_section, python_section
from compir.doctor.report import Section
from compir.errors import InputError
from compir.manifest import load_manifest

EPILOG = """examples:
  compir doctor                              # Python, extras, CPU class, --amp auto, providers, GPU, TensorRT, JetPack
  compir doctor exports/tiny                 # ... and which of the export's variants answers a query fastest here
  compir doctor exports/tiny --json --seconds 10 > doctor.json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir doctor",
        description="Say what this machine offers compir: Python and the installed extras, the CPU class (AVX2, AVX-512, VNNI, "
        "bf16, AMX, NEON), what --amp auto picks and why, onnxruntime's providers, the GPU with its driver and CUDA versions, "
        "TensorRT and whether compir supports it, the JetPack release on a Jetson, and, given an export folder, its fastest "
        "variant here. Every missing piece gets one line saying how to get it. Needs no torch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dir", nargs="?", type=Path, default=None, help="an export folder: time each of its variants")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--seconds", type=float, default=3.0, help="time to spend timing the export's variants, in all (default 3)")
    return parser


def diagnose(*, export_dir: Path | None = None, seconds: float = 3.0) -> list[Section]:
    """Every section of the report, in the order it prints."""
    gpu = gpu_section()
    has_gpu = bool(gpu.details.get("gpus"))
    sections = [python_section(), extras_section(), cpu_section(), amp_section(), onnxruntime_section(has_gpu=has_gpu), gpu,
                tensorrt_section(has_gpu=has_gpu), jetson_section()]
    if export_dir is not None:
        from compir.doctor.variants import export_section

        sections.append(export_section(export_dir, seconds=seconds))
    return sections


def format_text(sections: Sequence[Section]) -> str:
    width = max(len(section.name) for section in sections)
    lines = []
    for section in sections:
        lines.append(f"{section.name:<{width}}  {section.summary}")
        lines += [f"{'':<{width}}    {line}" for line in section.lines]
        lines += [f"{'':<{width}}  missing: {line}" for line in section.missing]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0:
        raise InputError(f"--seconds must be positive, got {args.seconds}")
    if args.export_dir is not None:
        load_manifest(args.export_dir, verify_files=False)  # not an export: one line and exit 2, before anything is timed
    sections = diagnose(export_dir=args.export_dir, seconds=args.seconds)
    if args.json:
        print(json.dumps({section.name: section.to_dict() for section in sections}, indent=1))
    else:
        print(format_text(sections))
    return 0
