"""``compir search``: one composed (or text-only) query against an index."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from compir.runtime.cli_args import add_prompt_template_arg, add_runtime_args, providers_from
from compir.runtime.retriever import Retriever
from compir.runtime.types import ZERO_SHOT_CACHE_NOTE

EPILOG = """examples:
  compir search exports/tiny indexes/tiny --reference-image data/synth/images/abc.png --text "make the circle red"
  compir search exports/tiny indexes/tiny --reference-id abc --text "remove the square" -k 5 --timings
  compir search exports/tiny indexes/tiny --text "a red circle" --json     (text-only query)
  compir search exports/p2w indexes/p2w --reference-id abc --text "make it red" --prompt-template "a * that is {modification}"
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compir search", description="Composed (reference + text) or text-only search.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", help="export folder")
    parser.add_argument("index_dir", help="index folder built with this export")
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument("--reference-image", metavar="PATH", default=None, help="reference image file")
    reference.add_argument("--reference-id", metavar="ID", default=None,
                           help="or a gallery item id as the reference (omit both for a text-only query)")
    parser.add_argument("--text", required=True, help="modification text (or a description for text-only)")
    parser.add_argument("-k", type=int, default=10, help="hits to return (default: %(default)s; clamped to the gallery size)")
    parser.add_argument("--rerank", action="store_true", help="re-rank the top candidates (needs a re-ranker)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timings", action="store_true",
                        help="print the latency of each stage, warm: the query runs once untimed first (texts are not cached)")
    add_runtime_args(parser)
    add_prompt_template_arg(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # With --timings every stage runs for real (no text cache) and the figures are warm: the first
    # query of a process pays lazy initialisation (image codecs, onnxruntime's first-run allocations).
    retriever = Retriever.from_dirs(args.export_dir, args.index_dir, backend=args.backend, providers=providers_from(args),
                                    variant=args.variant, text_cache_size=0 if args.timings else 1024,
                                    prompt_template=args.prompt_template)
    query = {"text": args.text, "reference_image": args.reference_image, "reference_id": args.reference_id}
    # a zero-shot export's prompt holds the reference's token: no text cache could serve a composed query
    uncached = retriever.encoder.zero_shot and (args.reference_image or args.reference_id) is not None
    cache_note = f"text cache: n/a (zero-shot: {ZERO_SHOT_CACHE_NOTE})" if uncached else "text not cached"
    if args.timings:
        retriever.search_detailed(**query, k=args.k, rerank=args.rerank)
    result = retriever.search_detailed(**query, k=args.k, rerank=args.rerank)
    if args.json:
        record: dict[str, object] = {"hits": [{"item_id": h.item_id, "score": h.score} for h in result.hits]}
        if args.timings:
            record["timings_ms"] = result.timings_ms
            record["timings"] = f"warm (second run of this query, {cache_note})"
        print(json.dumps(record, indent=2))
        return 0
    for rank, hit in enumerate(result.hits, start=1):
        print(f"{rank:>3}  {hit.score:+.4f}  {hit.item_id}")
    if args.timings:
        print(f"warm timings (second run of this query; {cache_note}): "
              + "  ".join(f"{stage} {ms:.2f} ms" for stage, ms in result.timings_ms.items()))
    return 0
