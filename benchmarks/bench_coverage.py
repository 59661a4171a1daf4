"""Coverage of open_clip's model zoo: which model names go train -> export -> index -> search.

For every name in ``open_clip.list_models()`` the architecture is shrunk structurally (one layer
per tower, widths of 32, 64-px images; each family keeps its own structure: a ModifiedResNet stays
a ModifiedResNet with the attention pool, a timm ConvNeXt stays a ConvNeXt, a SigLIP text tower
keeps its pooling and tokenizer) and run through compir's own CLI with the TG-CIR head (which
reads the image tokens): ``compir train`` (1 step) -> ``compir export onnx`` (fp32, parity checked)
-> ``compir index build`` -> ``compir search``. Random weights: nothing is downloaded; a tower that
needs a download to be built (Hugging Face text towers: their config) fails here for that reason.

Each name ends as ``pass``, ``unverified`` (every stage ran but open_clip's tokenizer, a Hugging
Face one, cannot be loaded offline to compare token ids), ``refused`` (a one-line compir error
naming why, e.g. CoCa) or ``FAIL`` (an unexpected exception: a traceback for the user, a bug, or
token ids that differ from open_clip's). Full: all names; ``--quick``: the first name of each family.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import io
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import BenchResult, markdown_table

NAME = "coverage"
DESCRIPTION = "open_clip model names (shrunk, random weights) that pass train -> export fp32 -> index -> search"

IMAGE_SIZE = 64
WIDTH = 32
TINY_PREFIX = "compir_tiny_"
_HEAD = {"name": "tgcir", "global_tokens": 2, "local_tokens": 2, "hidden_dim": 32, "matching_temperature": 0.1}
# Architecture overrides per timm model module (the timm entry points take them as keyword
# arguments): one block per stage, small widths. Hybrid towers keep their width (their conv stem's
# output must equal it).
_TIMM_SHRINK: dict[str, dict[str, Any]] = {
    "convnext": {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)},
    "fastvit": {"layers": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128)},
    "swin_transformer": {"depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "embed_dim": 16, "img_size": IMAGE_SIZE, "window_size": 4},
    "eva": {"depth": 1, "embed_dim": WIDTH, "num_heads": 2, "img_size": IMAGE_SIZE},
    "vision_transformer": {"depth": 1, "embed_dim": WIDTH, "num_heads": 2, "img_size": IMAGE_SIZE},
    "vision_transformer_relpos": {"depth": 1, "embed_dim": WIDTH, "num_heads": 2, "img_size": IMAGE_SIZE},
    "vision_transformer_hybrid": {"depth": 1, "img_size": IMAGE_SIZE},
    "vitamin": {"depth": 1, "img_size": IMAGE_SIZE},
}


def family(arch: dict[str, Any]) -> str:
    """``vision/text`` family of an open_clip architecture, e.g. ``resnet/clip``, ``timm:convnext/clip``."""
    vision, text = arch["vision_cfg"], arch["text_cfg"]
    if "multimodal_cfg" in arch:
        return "coca"
    if "timm_model_name" in vision:
        from timm.models import model_entrypoint

        tower = "timm:" + model_entrypoint(vision["timm_model_name"]).__module__.rsplit(".", 1)[-1]
    else:
        tower = "resnet" if isinstance(vision.get("layers"), (list, tuple)) else "vit"
    if "hf_model_name" in text:
        words = "hf-text"
    elif "hf_tokenizer_name" in text:
        words = "hf-tokenizer"  # open_clip's own text tower, a Hugging Face tokenizer (SigLIP, CLIPA, ...)
    else:
        words = "clip"
    return f"{tower}/{words}"


def shrink(arch: dict[str, Any]) -> dict[str, Any]:
    """The same architecture family at test size (timm trunks: registered under ``compir_tiny_<name>``)."""
    small = copy.deepcopy(arch)
    small["embed_dim"] = WIDTH
    vision = small["vision_cfg"]
    if "timm_model_name" in vision:
        vision["timm_model_name"] = _register_tiny_timm(str(vision["timm_model_name"]))
        vision["timm_model_pretrained"] = False
    elif isinstance(vision.get("layers"), (list, tuple)):  # ModifiedResNet: 4 stages, 8 * 32 = 256 channels at the end
        vision.update(layers=[1, 1, 1, 1], width=8, head_width=64)
    else:
        vision.update(layers=1, width=WIDTH, head_width=16)
    vision["image_size"] = IMAGE_SIZE
    text = small["text_cfg"]
    if "hf_model_name" not in text:
        text.update(layers=1, width=WIDTH, heads=2)
    return small


def _register_tiny_timm(name: str) -> str:
    import timm
    from timm.models import model_entrypoint, register_model

    tiny = TINY_PREFIX + name
    if timm.is_model(tiny):
        return tiny
    original = model_entrypoint(name)
    overrides = _TIMM_SHRINK.get(original.__module__.rsplit(".", 1)[-1], {})

    def entry(pretrained: bool = False, **kwargs: Any) -> Any:
        return original(pretrained=False, **{**kwargs, **overrides})

    entry.__name__ = tiny
    entry.__module__ = original.__module__
    register_model(entry)
    return tiny


def _stage(argv: list[str]) -> str:
    """Run ``compir ARGV``; '' on success, else the one-line error it printed."""
    from compir.cli import main as compir_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compir_main(argv)
    if code == 0:
        return ""
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {code}"


def check_name(name: str, *, work: Path, data: Path, images: Path) -> tuple[str, str]:
    """(result, detail) of one open_clip model name: pass / refused (compir's one-line error) / FAIL."""
    import open_clip

    folder = work / name
    folder.mkdir(parents=True)
    config = folder / "model.json"
    stages: list[tuple[str, Callable[[], list[str]]]] = [
        ("train", lambda: ["train", "--data", str(data), "--out", str(folder / "run"), "--model", str(config), "--epochs", "1",
                           "--steps-per-epoch", "1", "--batch-size", "4", "--amp", "off", "--val-queries", "4", "--no-progress"]),
        ("export", lambda: ["export", "onnx", str(folder / "run" / "best.pt"), "--out", str(folder / "export"), "--variants", "fp32",
                            "--calibration-data", str(data), "--calibration-count", "4"]),
        ("index", lambda: ["index", "build", str(folder / "export"), "--images", str(images), "--out", str(folder / "index"),
                           "--workers", "1", "--quiet"]),
        ("search", lambda: ["search", str(folder / "export"), str(folder / "index"), "--reference-id", sorted(images.glob("*.png"))[0].stem,
                            "--text", "make it red", "-k", "3", "--json"]),
    ]
    try:
        config.write_text(json.dumps({"open_clip": shrink(open_clip.get_model_config(name)), "head": _HEAD}), encoding="utf-8")
        for stage, argv in stages:
            error = _stage(argv())
            if error:
                return "refused", f"{stage}: {error}"
        return _compare_tokens(name, folder / "export")
    except Exception as exc:  # what a user would see as a traceback: the benchmark's finding, not its failure
        first = (str(exc).strip().splitlines() or [""])[0]
        return "FAIL", f"{type(exc).__name__}: {first[:200]}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_SAMPLES = ["make it red", "Replace the dog with TWO cats, and add a café sign!", "", "更大的 blue cube", "x" * 300]


def _compare_tokens(name: str, export: Path) -> tuple[str, str]:
    """The export's runtime tokenizer against open_clip's for ``name`` (exact ids), where open_clip's loads offline."""
    import numpy as np
    import open_clip

    from compir.runtime.encoder import Encoder

    ours = Encoder.from_export(export, providers=["cpu"]).tokenize(_SAMPLES)
    try:
        theirs = open_clip.get_tokenizer(name)(_SAMPLES, context_length=ours.shape[1]).numpy()
    except Exception as exc:  # a Hugging Face tokenizer that would need a download
        return "unverified", f"tokens not compared: open_clip's tokenizer does not load offline ({type(exc).__name__})"
    if theirs.shape != ours.shape or not np.array_equal(theirs, ours):
        wanted = open_clip.get_model_config(name)["text_cfg"].get("hf_tokenizer_name", "CLIP BPE")
        return "FAIL", f"tokens: the runtime's ids differ from open_clip's tokenizer ({wanted})"
    return "pass", ""


def run(*, out_dir: Path, quick: bool) -> BenchResult:
    import open_clip
    from tqdm import tqdm

    from compir.data.synth import SynthConfig
    from compir.data.synth_write import write_synthetic

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: fail at once, not after retries
    work = out_dir / "coverage-work"
    shutil.rmtree(work, ignore_errors=True)
    data, images = work / "data", work / "images"
    write_synthetic(data, seed=0, config=SynthConfig(n_train=32, n_val=8, n_test=8), workers=1)
    images.mkdir()
    for path in sorted((data / "images").glob("*.png"))[:8]:
        shutil.copy(path, images / path.name)
    names = open_clip.list_models()
    families = {name: _family_or_error(open_clip.get_model_config(name)) for name in names}
    if quick:
        firsts: dict[str, str] = {}
        for name in names:
            firsts.setdefault(families[name], name)
        names = list(firsts.values())
    rows: list[list[Any]] = []
    for name in tqdm(names, desc="open_clip models", unit="model"):
        started = time.perf_counter()
        result, detail = _isolated(name, work=work, data=data, images=images)
        rows.append([name, families[name], result, detail, round(time.perf_counter() - started, 1)])
        tqdm.write(" | ".join(str(cell) for cell in rows[-1]))  # an hour-long run shows its findings as it goes
    shutil.rmtree(work, ignore_errors=True)
    passed = sum(row[2] == "pass" for row in rows)
    by_family: dict[str, list[int]] = {}
    for row in rows:
        counts = by_family.setdefault(row[1], [0, 0])
        counts[0] += row[2] == "pass"
        counts[1] += 1
    table = markdown_table(["model", "family", "result", "reason", "s"], rows)
    summary = markdown_table(["family", "pass", "names"], [[name, p, n] for name, (p, n) in sorted(by_family.items())])
    notes = f"**{passed} of {len(rows)} open_clip {open_clip.__version__} model names pass** train -> export fp32 -> index -> search."
    return BenchResult(
        name=NAME,
        figures={"passed": passed, "total": len(rows), "open_clip": open_clip.__version__, "by_family": by_family,
                 "rows": [dict(zip(("model", "family", "result", "reason", "seconds"), row, strict=True)) for row in rows]},
        table=f"{summary}\n\n{table}\n\n{notes}",
        notes=notes,
    )


def _isolated(name: str, *, work: Path, data: Path, images: Path) -> tuple[str, str]:
    """:func:`check_name` in a forked process: a native crash (the shrunk FastViTs of MobileCLIP*-S*
    now and then crash in torch's CPU backward here) is that name's finding, not the end of the run."""
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(check_name, name, work=work, data=data, images=images).result()
        except concurrent.futures.process.BrokenProcessPool:
            shutil.rmtree(work / name, ignore_errors=True)
            return "FAIL", "the process crashed (a native fault, e.g. a segmentation fault)"


def _family_or_error(arch: dict[str, Any]) -> str:
    try:
        return family(arch)
    except Exception as exc:  # e.g. timm too old to know a tower
        return f"unknown ({type(exc).__name__})"
