"""``compir index``: build a gallery index (usearch, or a Milvus collection) from a folder of images."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from compir.runtime.build import build_index
from compir.runtime.build_ray import DEFAULT_RAY_BATCH_SIZE
from compir.runtime.cli_args import add_runtime_args, providers_from
from compir.runtime.encoder import Encoder
from compir.runtime.index import AUTO_DTYPE, DTYPE_CHOICES, HnswConfig
from compir.runtime.milvus_store import DEFAULT_COLLECTION, MilvusConfig
from compir.runtime.store import BACKENDS

EPILOG = """examples:
  compir index build exports/tiny --images data/synth/images --out indexes/tiny
  compir index build exports/tiny --images photos/ --out indexes/photos --dtype i8 --batch-size 128 --workers 8
  compir index build exports/tiny --images photos/ --out indexes/photos --copy-images --overwrite
  compir index build exports/tiny --images photos/ --out indexes/photos --expansion-search 512   # more recall, slower walk
  compir index build exports/tiny --images photos/ --out indexes/photos --index-backend milvus --milvus-uri gallery.db   # Milvus Lite
  compir index build exports/tiny --images photos/ --out indexes/photos --milvus-uri http://milvus:19530 \
      --collection photos --copy-images   # a Milvus server that several `compir serve` share
  compir index build exports/tiny --images photos/ --out indexes/photos2 --milvus-uri gallery.db \
      --collection photos --overwrite-collection photos   # refill a collection that indexes/photos uses
  compir index build exports/tiny --images photos/ --out indexes/photos --ray                  # Ray Data on this machine's cores
  compir index build exports/big --images /shared/photos --out /shared/idx --ray head:6379 --ray-actors 8 --shards /shared/shards
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compir index", description="Build a gallery index (usearch or Milvus, cosine).",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="encode a folder of images into an index folder",
                                description="Encode every image under --images with an export's image graph and write a "
                                "gallery index folder (usearch HNSW, cosine) that compir search / serve / demo read; or add the "
                                "items to a Milvus collection.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("export_dir", help="export folder (compir export onnx)")
    build.add_argument("--images", required=True, help="folder of gallery images (searched recursively)")
    build.add_argument("--out", required=True, help="index folder to create")
    build.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO_DTYPE,
                       help="the graph's vector storage; auto: the fastest of f32/f16/bf16/i8 within half a recall@10 point of "
                            "the best, timed on a 20k sample of this gallery on this CPU and recorded in index.json "
                            "(galleries of <= 16,384 items are searched exactly and get f16) (default: %(default)s)")
    build.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default: %(default)s)")
    build.add_argument("--workers", type=int, default=4, help="image decoding threads (default: %(default)s; with --ray, Ray tasks decode)")
    # --backend already picks the encoder runtime (onnxruntime / tensorrt), hence --index-backend.
    build.add_argument("--index-backend", choices=BACKENDS, default=None,
                       help="where the items live: usearch files in --out, or a Milvus collection "
                            "(default: milvus when --milvus-uri is given, else usearch)")
    build.add_argument("--milvus-uri", help="Milvus Lite file (*.db, embedded) or server (http://host:19530): the items go there")
    build.add_argument("--collection", default=DEFAULT_COLLECTION, help="Milvus collection name (default: %(default)s)")
    hnsw = HnswConfig()
    build.add_argument("--connectivity", type=int, default=hnsw.connectivity, help="HNSW links per node (Milvus: M) (default: %(default)s)")
    build.add_argument("--expansion-add", type=int, default=hnsw.expansion_add,
                       help="HNSW build breadth (Milvus: efConstruction) (default: %(default)s)")
    build.add_argument("--expansion-search", type=int, default=hnsw.expansion_search,
                       help="HNSW search breadth (Milvus: ef), saved with the index: recall vs speed (default: %(default)s)")
    add_runtime_args(build)
    build.add_argument("--copy-images", action="store_true", help="copy images into the index folder")
    build.add_argument("--overwrite", action="store_true",
                       help="replace an existing index folder (refused while a server or the demo writes it), and its "
                            "Milvus collection when no other index folder uses it")
    build.add_argument("--overwrite-collection", metavar="NAME", default=None,
                       help="replace Milvus collection NAME (= --collection) even where another index folder uses it: "
                            "that folder then sees the new items")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = build.add_argument_group("Ray Data (pip install \"compir[ray]\")")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="decode in Ray tasks and encode in a pool of Ray actors: on the cluster at ADDRESS, "
                          "or without one on a local Ray started with this machine's cores")
    ray.add_argument("--ray-actors", type=int, default=None, metavar="N",
                     help="encoder actors (default: one per GPU; on CPUs one per node, holding half its cores)")
    ray.add_argument("--ray-batch-size", type=int, default=DEFAULT_RAY_BATCH_SIZE, metavar="N",
                     help="images per Ray block: one decode task, one actor call, one shard (default: %(default)s)")
    ray.add_argument("--shards", default=None, metavar="DIR",
                     help="new folder to keep the Parquet shards (id, path, embeds, features) in; default: temporary, removed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.batch_size, args.workers, args.connectivity, args.expansion_add, args.expansion_search) < 1:
        print("compir index: --batch-size, --workers, --connectivity and --expansion-* must be >= 1", file=sys.stderr)
        return 2
    hnsw = HnswConfig(connectivity=args.connectivity, expansion_add=args.expansion_add, expansion_search=args.expansion_search)
    if (args.index_backend or ("milvus" if args.milvus_uri else "usearch")) == "milvus" and not args.milvus_uri:
        print("compir index: --index-backend milvus needs --milvus-uri (a Milvus Lite *.db file or http://host:19530)", file=sys.stderr)
        return 2
    if args.index_backend == "usearch" and args.milvus_uri:
        print("compir index: --milvus-uri is for --index-backend milvus", file=sys.stderr)
        return 2
    if args.overwrite_collection is not None and (not args.milvus_uri or args.overwrite_collection != args.collection):
        print(f"compir index: --overwrite-collection {args.overwrite_collection} must repeat --collection "
              f"({args.collection}) of a Milvus build (--milvus-uri)", file=sys.stderr)
        return 2
    milvus = MilvusConfig.from_hnsw(args.milvus_uri, collection=args.collection, hnsw=hnsw) if args.milvus_uri else None
    if args.ray is not None:
        from compir.runtime.build_ray import build_index_ray

        report = build_index_ray(
            args.export_dir, images=args.images, out=args.out, address=args.ray or None, actors=args.ray_actors,
            ray_batch_size=args.ray_batch_size, batch_size=args.batch_size, backend=args.backend, providers=providers_from(args),
            variant=args.variant, dtype=args.dtype, copy_images=args.copy_images, overwrite=args.overwrite, hnsw=hnsw,
            milvus=milvus, overwrite_collection=args.overwrite_collection, shards=args.shards, progress=not args.quiet,
        )
    else:
        encoder = Encoder.from_export(
            args.export_dir, backend=args.backend, providers=providers_from(args), variant=args.variant, spinning=False
        )
        report = build_index(encoder, images=args.images, out=args.out, dtype=args.dtype, batch_size=args.batch_size,
                             workers=args.workers, copy_images=args.copy_images, overwrite=args.overwrite, hnsw=hnsw,
                             milvus=milvus, overwrite_collection=args.overwrite_collection, progress=not args.quiet)
    for _, reason in report.skipped:  # the reason names the file(s)
        print(f"skipped: {reason}", file=sys.stderr)
    print(f"indexed {report.count} images into {report.out_dir} ({report.images_per_s:.1f} images/s); "
          f"skipped {len(report.skipped)} (unreadable, or no valid item id)")
    return 0 if report.count or not report.skipped else 1
