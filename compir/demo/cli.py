"""``compir demo EXPORT_DIR INDEX_DIR``: the Gradio demo on 127.0.0.1 (no public share link)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from compir.demo.session import DEFAULT_MAX_UPLOAD_BYTES
from compir.errors import InputError
from compir.manifest import load_manifest, manifest_sha256
from compir.ports import LOOPBACK, check_port
from compir.runtime.cli_args import add_prompt_template_arg
from compir.runtime.gallery import read_index_record
from compir.runtime.writer_lock import WriterLock

HOST = LOOPBACK

EPILOG = """examples:
  compir demo exports/tiny indexes/tiny                       # http://127.0.0.1:7860
  compir demo exports/tiny indexes/tiny --examples data/synth --port 7861
  compir demo exports/p2w indexes/p2w --prompt-template "a photo of * that {modification}"   (zero-shot export)

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
    add_prompt_template_arg(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_before_start(args.export_dir, args.index_dir, port=args.port, examples=args.examples, prompt_template=args.prompt_template)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    from compir.demo.launch import launch_demo

    try:
        app = launch_demo(
            args.export_dir,
            args.index_dir,
            port=args.port,
            examples_dir=args.examples,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            block=True,
            prompt_template=args.prompt_template,
        )
    except OSError as exc:  # the port was taken between the check and the launch
        raise InputError(f"cannot listen on {HOST}:{args.port} ({exc}); choose another with --port") from exc
    app.close()
    return 0


def check_before_start(export_dir: str | os.PathLike[str], index_dir: str | os.PathLike[str], *, port: int,
                       examples: str | os.PathLike[str] | None = None, prompt_template: str | None = None) -> None:
    """What would make the demo fail, found in a second, before Gradio (seconds to import) loads.

    The export's manifest and checksums, the index's record and its binding to this export, no
    other writer of the index, the examples folder if one is named, and the port. Raises
    ContractError / InputError with one clear line."""
    if examples is not None and not Path(examples).is_dir():
        raise InputError(f"--examples {examples}: no such folder; name a dataset folder (as written by "
                         "`compir data synth`), or leave it out to use the gallery's own")
    manifest = load_manifest(Path(export_dir))
    if prompt_template is not None:
        manifest.composition_spec.template(prompt_template)  # a bad template (or a learned composer): one line, now
    record, _ = read_index_record(Path(index_dir), encoder=manifest.encoder_fingerprint(),
                                  manifest_sha256=manifest_sha256(Path(export_dir)))
    if record.get("backend", "usearch") == "usearch":
        WriterLock.acquire(Path(index_dir)).release()  # the demo writes: another writer is refused now, naming it
    check_port(port)
