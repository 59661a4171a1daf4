"""Write the synthetic benchmark to disk in the CIRR layout (plus compir's extras).

Layout under the output folder::

    dataset.json                         format "compir.synthetic": seed, config, counts, sha256s
    captions/cap.rc2.<split>.json        CIRR records + "kind" (add / remove / change / move),
                                         "attribute" (colour / size / shape for change) and "unseen"
    captions/scene.<split>.json          image name -> [scene description] (text -> image retrieval)
    captions/identity.<split>.json       image name -> object identity (MMRef; same objects up to layout)
    image_splits/split.rc2.<split>.json  image name -> "./images/<name>.png"
    images/<name>.png                    one image per distinct scene (the name is the scene key)

The same seed and config give the same bytes in every file (a test hashes them).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from compir.contracts import atomic_output_dir, sha256_file, write_contract
from compir.data.synth import SPLITS, SplitPlan, SynthConfig, plan_dataset
from compir.data.synth_scene import parse_scene_key, render_scene, scene_caption, scene_identity

SYNTH_FORMAT = "compir.synthetic"
SYNTH_SCHEMA = 1
DATASET_FILE = "dataset.json"
_MAX_CHUNK = 512


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_synthetic` wrote: the folder, the query / image counts and the time taken."""

    root: Path
    counts: dict[str, dict[str, int]]
    n_images: int


def caption_file(split: str) -> str:
    return f"captions/cap.rc2.{split}.json"


def scene_caption_file(split: str) -> str:
    return f"captions/scene.{split}.json"


def identity_file(split: str) -> str:
    return f"captions/identity.{split}.json"


def image_split_file(split: str) -> str:
    return f"image_splits/split.rc2.{split}.json"


def image_relpath(name: str) -> str:
    return f"./images/{name}.png"


def _records(plan: SplitPlan) -> list[dict[str, Any]]:
    set_ids = {reference: index for index, reference in enumerate(plan.siblings)}
    records = []
    for pairid, query in enumerate(plan.queries):
        reference, target = query.reference.key, query.target.key
        members = [reference, *plan.siblings[reference]]
        records.append(
            {
                "pairid": pairid,
                "reference": reference,
                "target_hard": target,
                "target_soft": {target: 1.0},
                "caption": query.text,
                "img_set": {
                    "id": set_ids[reference],
                    "members": members,
                    "reference_rank": 0,
                    "target_rank": members.index(target),
                },
                "kind": query.kind,
                "attribute": query.attribute,
                "unseen": query.unseen,
            }
        )
    return records


def _counts(plan: SplitPlan) -> dict[str, int]:
    counts = {"queries": len(plan.queries), "references": len(plan.siblings), "gallery": len(plan.gallery())}
    counts["unseen"] = sum(query.unseen for query in plan.queries)
    for kind in sorted({query.kind for query in plan.queries}):
        counts[f"kind={kind}"] = sum(query.kind == kind for query in plan.queries)
    return counts


def _dump(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def _render_chunk(job: tuple[Sequence[str], int, str]) -> int:
    names, size, folder = job
    for name in names:
        render_scene(parse_scene_key(name), size=size).save(Path(folder) / f"{name}.png", format="PNG")
    return len(names)


def render_images(names: Sequence[str], *, folder: Path, size: int, workers: int) -> None:
    """Render and PNG-encode every named scene into ``folder`` on ``workers`` processes."""
    folder.mkdir(parents=True, exist_ok=True)
    # a few chunks per worker keep them all busy; chunks amortise the inter-process traffic
    chunk = max(16, min(_MAX_CHUNK, -(-len(names) // (4 * max(workers, 1)))))
    jobs = [(list(names[i : i + chunk]), size, str(folder)) for i in range(0, len(names), chunk)]
    with tqdm(total=len(names), desc="render", unit="img", disable=None) as progress:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                progress.update(_render_chunk(job))
            return
        # spawn, not fork: the caller may hold threads (torch, a server) that fork would copy mid-lock
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for done in pool.imap_unordered(_render_chunk, jobs):
                progress.update(done)


def write_synthetic(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    config: SynthConfig = SynthConfig(),
    workers: int | None = None,
    overwrite: bool = False,
) -> SynthSummary:
    """Render the synthetic benchmark into ``out_dir`` (atomically: all of it or nothing).

    ``workers`` defaults to the CPU count. Raises ContractError if ``out_dir`` is not empty and
    ``overwrite`` is False.
    """
    plans = plan_dataset(seed=seed, config=config)
    names = sorted({name for plan in plans.values() for name in plan.gallery()})
    if workers is None:
        workers = os.cpu_count() or 1
    target = Path(out_dir)
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        files: dict[str, str] = {}
        for split, plan in plans.items():
            gallery = plan.gallery()
            _dump(tmp / caption_file(split), _records(plan))
            _dump(tmp / image_split_file(split), {name: image_relpath(name) for name in gallery})
            _dump(tmp / scene_caption_file(split), {name: [scene_caption(parse_scene_key(name))] for name in gallery})
            _dump(tmp / identity_file(split), {name: scene_identity(parse_scene_key(name)) for name in gallery})
            for relpath in (caption_file(split), image_split_file(split), scene_caption_file(split), identity_file(split)):
                files[relpath] = sha256_file(tmp / relpath)
        render_images(names, folder=tmp / "images", size=config.image_size, workers=workers)
        counts = {split: _counts(plan) for split, plan in plans.items()}
        write_contract(
            tmp / DATASET_FILE,
            fmt=SYNTH_FORMAT,
            schema_version=SYNTH_SCHEMA,
            body={
                "seed": seed,
                "config": config.to_dict(),
                "counts": counts,
                "n_images": len(names),
                "splits": list(SPLITS),
                "sha256": files,
            },
        )
    return SynthSummary(root=target, counts=counts, n_images=len(names))
