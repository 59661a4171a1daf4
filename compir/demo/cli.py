"""``compir demo EXPORT_DIR INDEX_DIR``: the Gradio demo on 127.0.0.1 (no public share link)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from compir.demo.session import DEFAULT_MAX_UPLOAD_BYTES

EPILOG = """examples:
  compir demo exports/tiny indexes/tiny                       # http://127.0.0.1:7860
  compir demo exports/tiny indexes/tiny --examples data/synth --port 7861

The page runs on the torch-free runtime only. It listens on 127.0.0.1; there is deliberately
no --share: put it behind your own authenticated proxy to expose it.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir demo",
        description="A web page for composed image retrieval over an export and an index.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dir", help="export folder (compir export onnx ...)")
    parser.add_argument("index_dir", help="index folder (compir index build ...); images added on the page are saved here")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--examples", metavar="DATA_DIR", default=None,
                        help="dataset to take example queries from (default: the synthetic dataset the "
                             "gallery images come from, if any)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                        help="largest image file accepted (default %(default)g)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    from compir.demo.launch import launch_demo

    app = launch_demo(
        args.export_dir,
        args.index_dir,
        port=args.port,
        examples_dir=args.examples,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        block=True,
    )
    app.close()
    return 0
