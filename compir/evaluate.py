"""``compir eval``: a dataset's protocol metrics for a checkpoint or an export folder.

A checkpoint is evaluated with torch (:mod:`compir.train.evaluation`), beside training-free baselines
on the same gallery and protocol: *image-only* (the reference's own gallery vector as the query),
*text-only* (the modification text's vector) and, with ``--sum-baseline`` and always for a zero-shot
(Pic2Word) checkpoint, *image + text* (the normalised sum of those two). A zero-shot checkpoint's
composed query is its prompt template (``--template``) read with the reference's pseudo token. An export folder is evaluated through the
runtime (:func:`compir.runtime.evaluation.encode_split_for_export`, onnxruntime, no torch),
composed queries only. Stages are imported lazily: this module is part of compir's core.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compir.contracts import MANIFEST_FILE, atomic_write_bytes
from compir.data.load import FORMATS, load_split
from compir.errors import ContractError, InputError
from compir.prompts import DEFAULT_TEMPLATE, PromptTemplate

if TYPE_CHECKING:
    from compir.metrics import EvalReport

# FashionIQ galleries: the whole split of the category (CLIP4Cir's protocol, the default) or the
# val queries' own images with the reference removed (TG-CIR's, to compare with its published figures).
GALLERIES = ("split", "val-queries")
MODE_LABELS = {"composed": "composed", "image_only": "image only", "text_only": "text only", "sum": "image + text"}

EPILOG = """examples:
  compir eval runs/tiny/best.pt --data data/synth
  compir eval runs/tiny/best.pt --data data/synth --split val --json val.json
  compir eval exports/tiny --data data/synth --variant int8-dynamic
  compir eval exports/tiny --data /datasets/cirr --split test1 --submission submit/   # CIRR test server files
  compir eval runs/fiq/best.pt --data /datasets/fashioniq --split val --gallery val-queries   # TG-CIR's protocol
  compir eval runs/tiny/best.pt --data data/synth --sum-baseline       # also the normalised image + text sum
  compir eval runs/pic2word/best.pt --data data/synth --template "a photo of * that is {modification}"   # zero-shot
"""


@dataclass(frozen=True)
class EvalResult:
    """Reports per query mode (``composed`` first; baselines for checkpoints)."""

    source: Path
    source_kind: str  # "checkpoint" | "export"
    split: str
    reports: dict[str, EvalReport]

    def format(self) -> str:
        composed = self.reports["composed"]
        lines = [
            f"{self.source_kind} {self.source} on split {self.split!r} ({composed.protocol} protocol, {composed.n_queries} queries)",
            "",
            composed.format_table(),
        ]
        if len(self.reports) > 1:
            lines += ["", "against the baselines (same gallery, same protocol):", "", format_comparison(self.reports)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "source_kind": self.source_kind,
            "split": self.split,
            "reports": {mode: report.to_dict() for mode, report in self.reports.items()},
        }


def format_comparison(reports: dict[str, EvalReport], *, groups: Sequence[str] = ("seen", "unseen")) -> str:
    """Markdown: one row per query mode, overall metrics plus R@1 / R@10 of some breakdown groups."""
    first = next(iter(reports.values()))
    columns = list(first.metrics)
    extra = [(g, m) for g in groups if g in first.breakdown for m in ("R@1", "R@10") if m in first.breakdown[g]]
    header = columns + [f"{m} {g}" for g, m in extra]
    lines = ["| query | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for mode, report in reports.items():
        cells = [f"{report.metrics[c]:.2f}" for c in columns]
        cells += [f"{report.breakdown.get(g, {}).get(m, float('nan')):.2f}" for g, m in extra]
        lines.append(f"| {MODE_LABELS.get(mode, mode)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_path(
    path: str | Path,
    *,
    data: str | Path,
    split: str = "test",
    fmt: str = "auto",
    batch_size: int = 128,
    baselines: bool = True,
    device: str = "auto",
    backend: str = "onnxruntime",
    variant: str | None = None,
    progress: bool = True,
    gallery: str = "split",
    sum_baseline: bool = False,
    template: str = DEFAULT_TEMPLATE,
) -> EvalResult:
    """Evaluate a checkpoint file or an export folder on ``split`` of the dataset under ``data``.

    ``gallery``: one of :data:`GALLERIES` ("val-queries": TG-CIR's FashionIQ gallery, FashionIQ only).
    ``sum_baseline``: also the normalised image + text baseline (always for a zero-shot checkpoint);
    ``template``: a zero-shot checkpoint's prompt (checked first: the placeholder once).
    """
    PromptTemplate(template)
    if gallery not in GALLERIES:
        raise InputError(f"--gallery must be one of {', '.join(GALLERIES)}, got {gallery!r}")
    source = Path(path)
    dataset = load_split(data, split=split, fmt=fmt)
    if gallery == "val-queries":
        from compir.data.fashioniq import val_query_gallery

        dataset = val_query_gallery(dataset)
    if not any(query.targets for query in dataset.queries):
        raise InputError(
            f"split {split!r} of {data} has no target labels (e.g. CIRR test1); evaluate on a labelled split, "
            "or write the CIRR test-server files with --submission DIR"
        )
    if source.is_dir():
        if not (source / MANIFEST_FILE).is_file():
            raise ContractError(f"{source} is a folder without {MANIFEST_FILE}: neither a checkpoint file nor an export folder")
        return EvalResult(source, "export", split, {"composed": _evaluate_export(source, dataset, backend, variant, batch_size)})
    if not source.is_file():
        raise ContractError(f"{source} does not exist; pass a checkpoint (.pt) or an export folder")
    from compir.train.checkpoint import load_checkpoint
    from compir.train.distributed import resolve_device
    from compir.train.evaluation import evaluate_model, query_modes

    chosen = resolve_device(device)
    loaded = load_checkpoint(source, map_location=chosen)
    modes = query_modes(loaded.model, baselines=baselines, sum_baseline=sum_baseline)
    reports = evaluate_model(loaded.model, dataset, modes=modes, batch_size=batch_size, device=chosen, progress=progress,
                             template=template)
    return EvalResult(source, "checkpoint", split, reports)


def write_submission(
    path: str | Path,
    *,
    data: str | Path,
    split: str,
    out_dir: str | Path,
    batch_size: int = 128,
    device: str = "auto",
    backend: str = "onnxruntime",
    variant: str | None = None,
    progress: bool = True,
) -> Any:
    """Rank a CIRR split (``test1``: labels hidden) and write the test server's two JSON files."""
    from compir.data.submission import write_cirr_submission

    source = Path(path)
    dataset = load_split(data, split=split, fmt="cirr")
    if source.is_dir():
        from compir.runtime.evaluation import encode_split_for_export

        queries, gallery, names = encode_split_for_export(source, dataset, backend=backend, variant=variant, batch_size=batch_size)
    else:
        from compir.train.checkpoint import load_checkpoint
        from compir.train.distributed import resolve_device
        from compir.train.evaluation import encode_split

        chosen = resolve_device(device)
        embeds = encode_split(load_checkpoint(source, map_location=chosen).model, dataset, batch_size=batch_size,
                              device=chosen, progress=progress)
        queries, gallery, names = embeds.queries["composed"], embeds.gallery_embeds, list(embeds.gallery_names)
    return write_cirr_submission(dataset, query_embeds=queries, gallery_embeds=gallery, gallery_names=names, out_dir=out_dir)


def _evaluate_export(source: Path, dataset: Any, backend: str, variant: str | None, batch_size: int) -> EvalReport:
    try:
        from compir.runtime.evaluation import encode_split_for_export
    except ImportError as exc:
        raise ContractError(f"evaluating an export folder needs compir.runtime.evaluation, which is unavailable ({exc})") from exc
    from compir.metrics import evaluate_split

    queries, gallery, names = encode_split_for_export(source, dataset, backend=backend, variant=variant, batch_size=batch_size)
    return evaluate_split(dataset, query_embeds=queries, gallery_embeds=gallery, gallery_names=names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir eval",
        description="Protocol metrics of a checkpoint (with image-only / text-only baselines) or an export folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="checkpoint file (.pt) or export folder (with manifest.json)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root")
    parser.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="auto", help="dataset format (default: detect)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-baselines", action="store_true", help="composed queries only")
    parser.add_argument("--sum-baseline", action="store_true",
                        help="checkpoints: also the normalised sum of the image-only and text-only vectors (always shown for a "
                             "zero-shot checkpoint)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE,
                        help="zero-shot checkpoints: the prompt, the placeholder * once (default: %(default)r)")
    parser.add_argument("--device", default="auto", help="checkpoints: auto, cpu, cuda")
    parser.add_argument("--backend", default="onnxruntime", help="exports: runtime backend (default: %(default)s)")
    parser.add_argument("--variant", help="exports: variant to evaluate (default: the manifest's default)")
    parser.add_argument("--json", type=Path, help="also write the reports to this JSON file")
    parser.add_argument("--submission", type=Path, metavar="DIR",
                        help="CIRR only: write the test server's recall / recall_subset JSON files into DIR instead of scoring")
    parser.add_argument("--gallery", choices=GALLERIES, default="split",
                        help="FashionIQ: rank against the whole split of the category (CLIP4Cir's protocol, default) or only "
                             "the split's query images with the reference removed (val-queries: TG-CIR's protocol)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.submission:
        written = write_submission(
            args.source, data=args.data, split=args.split, out_dir=args.submission, batch_size=args.batch_size,
            device=args.device, backend=args.backend, variant=args.variant, progress=not args.no_progress,
        )
        print(f"wrote {written.recall} and {written.recall_subset}")
        return 0
    result = evaluate_path(
        args.source, data=args.data, split=args.split, fmt=args.fmt, batch_size=args.batch_size,
        baselines=not args.no_baselines, device=args.device, backend=args.backend, variant=args.variant,
        progress=not args.no_progress, gallery=args.gallery, sum_baseline=args.sum_baseline, template=args.template,
    )
    print(result.format())
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(result.to_dict(), indent=1) + "\n").encode("utf-8"))
        print(f"\nwrote {args.json}")
    return 0
