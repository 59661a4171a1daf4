"""``compir serve EXPORT_DIR INDEX_DIR``: the HTTP API (FastAPI + uvicorn) over a Retriever."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from PIL import Image

from compir.ports import check_port
from compir.runtime.cli_args import add_prompt_template_arg, add_runtime_args, providers_from
from compir.runtime.ray_cluster import LOCAL, RAY_EXTRA
from compir.service.config import BatchingConfig, Limits, ServiceConfig, resolve_batching

EPILOG = """examples:
  compir serve exports/tiny indexes/tiny                     # http://127.0.0.1:8000/docs
  COMPIR_API_KEY=secret compir serve exports/tiny indexes/tiny --host 0.0.0.0
  compir serve exports/tiny indexes/tiny --batching on --batch-wait-ms 5 --max-k 50
  compir serve exports/tiny indexes/tiny --ort-spinning on   # a machine with cores to spare: lower latency
  compir serve exports/p2w indexes/p2w --prompt-template "a photo of * that {modification}"   (zero-shot export)

  curl -F reference=@shoe.png -F text='make it red' -F k=5 http://127.0.0.1:8000/search
  curl -H 'content-type: application/json' -d '{"text": "a red circle", "k": 5}' \\
       http://127.0.0.1:8000/search/text
  curl -F files=@new.png http://127.0.0.1:8000/gallery/items

  # the same API on Ray Serve: 2 HTTP replicas (encoders) and one gallery owner (a usearch index or
  # a Milvus Lite file; over a Milvus server each replica opens the collection itself)
  compir serve exports/tiny indexes/tiny --ray --replicas 2          # starts a Ray on this machine
  compir serve exports/tiny indexes/tiny --ray=auto --autoscale 1:8  # joins the running Ray cluster
  (put --ray after EXPORT_DIR INDEX_DIR, or write --ray=ADDRESS: a bare --ray takes the next word as ADDRESS)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compir serve",
        description="Serve composed (and text-only) search and gallery edits over HTTP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dir", help="export folder (compir export onnx ...)")
    parser.add_argument("index_dir", help="index folder (compir index build ...); gallery edits are saved here")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require this key in X-API-Key (default: $COMPIR_API_KEY)")
    add_runtime_args(parser)
    add_prompt_template_arg(parser)
    batching = parser.add_argument_group("dynamic batching of concurrent searches")
    batching.add_argument("--batching", choices=["auto", "on", "off"], default="auto",
                          help="auto (default): on when the encoders run on a GPU, off on a CPU")
    batching.add_argument("--max-batch", type=int, default=BatchingConfig.max_batch)
    batching.add_argument("--batch-wait-ms", type=float, default=BatchingConfig.wait_ms,
                          help="how long the first query of a batch waits for company")
    limits = parser.add_argument_group("request limits")
    for limit in fields(Limits):
        limits.add_argument("--" + limit.name.replace("_", "-"), type=int, default=limit.default, help=f"default {limit.default}")
    parser.add_argument("--workers", type=int, default=ServiceConfig.worker_threads,
                        help="threads that decode uploads and run unbatched searches")
    parser.add_argument("--ort-spinning", choices=["on", "off"], default="off",
                        help="onnxruntime's idle pool threads spin between requests (on) or sleep (off, the default: "
                             "the event loop and worker threads share the cores)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ray = parser.add_argument_group(f"Ray Serve (needs: {RAY_EXTRA})")
    ray.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                     help="serve on Ray Serve: bare --ray starts a Ray on this machine; ADDRESS (auto, ray://host:10001) joins one")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="HTTP replicas, each with its own encoders (default 2)")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="let Serve scale the HTTP replicas between MIN and MAX")
    return parser


def config_from_args(args: argparse.Namespace, *, backend_info: dict[str, Any]) -> ServiceConfig:
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    batching = resolve_batching(args.batching, backend_info=backend_info, max_batch=args.max_batch, wait_ms=args.batch_wait_ms)
    api_key = args.api_key or os.environ.get("COMPIR_API_KEY") or None
    return ServiceConfig(limits=limits, batching=batching, api_key=api_key, worker_threads=args.workers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.ray is None and (args.replicas is not None or args.autoscale is not None):
        parser.error("--replicas and --autoscale scale a Ray Serve deployment: add --ray")
    bomb = Image.MAX_IMAGE_PIXELS  # Pillow refuses larger images as decompression bombs
    if bomb is not None and args.max_image_pixels > bomb:
        parser.error(f"--max-image-pixels {args.max_image_pixels} is over Pillow's decompression-bomb limit of {bomb}")
    check_port(args.port, host=args.host)  # a taken port is one line and exit 2, before anything slow loads
    if args.ray is not None:
        return _serve_on_ray(args)

    import uvicorn

    from compir.runtime.retriever import Retriever
    from compir.service.app import create_app
    from compir.service.engine import ServiceEngine
    from compir.service.server import uvicorn_options

    retriever = Retriever.from_dirs(
        args.export_dir, args.index_dir, backend=args.backend, providers=providers_from(args), variant=args.variant,
        writable=True,  # one writer per index: a second `compir serve` of this folder is refused, naming this one's pid
        prompt_template=args.prompt_template, spinning=args.ort_spinning == "on",
    )
    config = config_from_args(args, backend_info=retriever.backend_info)
    engine = ServiceEngine(retriever, config=config)  # the retriever is warm: from_dirs ran warm_up
    batching = config.batching
    warm_ms = retriever.warmed_up.ms if retriever.warmed_up is not None else 0.0
    print(
        f"compir serve: {len(retriever)} items, backend {retriever.backend_info}; warmed up in {warm_ms:.0f} ms; "
        + (f"dynamic batching on (max {batching.max_batch}, wait {batching.wait_ms:g} ms" if batching.enabled
           else "dynamic batching off (")
        + f"{'; ' if batching.enabled else ''}{batching.reason}); auth {'X-API-Key' if config.api_key else 'none'}\n"
        f"compir serve: http://{args.host}:{args.port}  (API docs at /docs, schema at /openapi.json)",
        file=sys.stderr,
        flush=True,
    )
    if not config.api_key and not _is_loopback(args.host):
        print(f"compir serve: warning: {args.host} is reachable from other machines and no API key is set "
              "(--api-key or COMPIR_API_KEY)", file=sys.stderr)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, **uvicorn_options(args.log_level))
    return 0


def _serve_on_ray(args: argparse.Namespace) -> int:
    from compir.manifest import load_manifest, manifest_sha256
    from compir.runtime.gallery import read_index_record
    from compir.service import ray_serve

    ray_serve.import_serve()  # the missing extra is named before anything slow starts
    autoscale = ray_serve.Scale.parse_autoscale(args.autoscale) if args.autoscale is not None else None
    scale = ray_serve.Scale(replicas=args.replicas if args.replicas is not None else 2, autoscale=autoscale)
    # A mismatched export and index are refused here, in a second, not by a replica after Ray starts.
    manifest = load_manifest(args.export_dir)
    if args.prompt_template is not None:
        manifest.composition_spec.template(args.prompt_template)  # a bad template: one line, before Ray starts
    read_index_record(Path(args.index_dir), encoder=manifest.encoder_fingerprint(), manifest_sha256=manifest_sha256(args.export_dir))
    providers = providers_from(args)
    spec = ray_serve.RaySpec(
        export_dir=str(Path(args.export_dir).resolve()), index_dir=str(Path(args.index_dir).resolve()),
        config=config_from_args(args, backend_info={}), batching_mode=args.batching,  # resolved on each replica
        backend=args.backend, providers=tuple(providers) if providers else None, variant=args.variant, scale=scale,
        prompt_template=args.prompt_template, spinning=args.ort_spinning == "on",
    )
    if not spec.config.api_key and not _is_loopback(args.host):
        print(f"compir serve: warning: {args.host} is reachable from other machines and no API key is set "
              "(--api-key or COMPIR_API_KEY)", file=sys.stderr)
    return ray_serve.serve_forever(spec, address=args.ray, host=args.host, port=args.port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
