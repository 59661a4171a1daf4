"""Coverage of open_clip's model zoo: which model names go train -> export -> index -> search.

For every name in ``open_clip.list_models()`` the architecture is shrunk structurally (one layer
per tower, widths of 32, 64-px images; each family keeps its own structure: a ModifiedResNet stays
a ModifiedResNet with the attention pool, a timm ConvNeXt stays a ConvNeXt, a SigLIP text tower
keeps its pooling and tokenizer) and run through compir's own CLI with the TG-CIR head (which
reads the image tokens): ``compir train`` (1 step) -> ``compir export onnx`` (fp32, parity checked)
-> ``compir index build`` -> ``compir search``. Random weights: nothing is downloaded.

Offline stand-ins (``--offline-standins``, default ``auto``: on where the Hugging Face Hub cannot be
reached or ``HF_HUB_OFFLINE`` is set): a name whose ``hf_tokenizer_name`` / ``hf_model_name`` is a
Hub id gets a locally built tokenizer of the same class (BertTokenizer, T5Tokenizer, ...) and a tiny
random HF text tower of the same model type (benchmarks/text_standins.py), keeping the name's own
context length, tokenizer options and pooling; its row says ``stand-in`` in the vocabulary column
(the ids are compared with open_clip's tokenizer on the stand-in, not on the real vocabulary).
Without stand-ins such a name is refused for want of the download.

Each name ends as ``pass``, ``unverified`` (every stage ran but open_clip's tokenizer, a Hugging
Face one, cannot be loaded offline to compare token ids), ``refused`` (a one-line compir error
naming why, e.g. CoCa) or ``FAIL`` (an unexpected exception: a traceback for the user, a bug, or
token ids that differ from open_clip's). Full: all names; ``--quick``: the first name of each family.

Run alone with options: ``python -m benchmarks.bench_coverage --offline-standins on --hub-only --shard 1/2``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import BenchResult, machine_info, markdown_table

NAME = "coverage"
DESCRIPTION = "open_clip model names (shrunk, random weights) that pass train -> export fp32 -> index -> search"

IMAGE_SIZE = 64
WIDTH = 32
TINY_PREFIX = "compir_tiny_"
STANDIN_VOCAB = 1024  # >= every stand-in tokenizer's vocabulary (benchmarks/text_standins.py)
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


def hub_ids(arch: dict[str, Any]) -> dict[str, str]:
    """The text config's ``hf_tokenizer_name`` / ``hf_model_name`` values that are Hub ids (not local folders)."""
    text = arch["text_cfg"]
    return {key: str(text[key]) for key in ("hf_tokenizer_name", "hf_model_name") if text.get(key) and not Path(str(text[key])).is_dir()}


def standin_label(arch: dict[str, Any]) -> str:
    """What stands in for the name's Hub files, e.g. ``stand-in bert tokenizer``; '' when none is needed."""
    from benchmarks.text_standins import standin_family

    ids = hub_ids(arch)
    parts = []
    if "hf_tokenizer_name" in ids:
        parts.append(f"{standin_family(ids['hf_tokenizer_name'])} tokenizer")
    if "hf_model_name" in ids:
        parts.append(f"{standin_family(ids['hf_model_name'], tower=True)} tower")
    return "stand-in " + " + ".join(parts) if parts else ""


def build_standins(folder: Path) -> dict[str, Path]:
    """Every stand-in tokenizer and HF text tower, by ``tokenizer:<family>`` / ``tower:<family>``."""
    from benchmarks.text_standins import TOKENIZER_FAMILIES, TOWER_FAMILIES, build_text_tower, build_tokenizer

    built = {f"tokenizer:{family}": build_tokenizer(folder / f"tokenizer-{family}", family) for family in TOKENIZER_FAMILIES}
    built.update({f"tower:{family}": build_text_tower(folder / f"tower-{family}", family) for family in TOWER_FAMILIES})
    return built


def substitute_standins(arch: dict[str, Any], standins: dict[str, Path]) -> None:
    """Point the (shrunk) config's Hub ids at the local stand-ins; every other text setting is kept.
    A text tower of open_clip's own gets a vocabulary size that the stand-in's ids fit (its width is shrunk too)."""
    from benchmarks.text_standins import standin_family

    text = arch["text_cfg"]
    ids = hub_ids(arch)
    if "hf_tokenizer_name" in ids:
        text["hf_tokenizer_name"] = str(standins[f"tokenizer:{standin_family(ids['hf_tokenizer_name'])}"])
        if "vocab_size" in text:
            text["vocab_size"] = STANDIN_VOCAB
    if "hf_model_name" in ids:
        text["hf_model_name"] = str(standins[f"tower:{standin_family(ids['hf_model_name'], tower=True)}"])


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


def check_name(name: str, *, work: Path, data: Path, images: Path, standins: dict[str, Path] | None = None) -> tuple[str, str]:
    """(result, detail) of one open_clip model name: pass / refused (compir's one-line error) / FAIL.
    ``standins`` (from :func:`build_standins`): Hub tokenizers and text towers replaced by local stand-ins."""
    import open_clip

    folder = work / name
    folder.mkdir(parents=True)
    config = folder / "model.json"
    arch = shrink(open_clip.get_model_config(name))
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
        if standins is not None:
            substitute_standins(arch, standins)
        config.write_text(json.dumps({"open_clip": arch, "head": _HEAD}), encoding="utf-8")
        for stage, argv in stages:
            error = _stage(argv())
            if error:
                return "refused", f"{stage}: {error}"
        return _compare_tokens(_open_clip_tokenizer_name(name, arch, folder), folder / "export")
    except Exception as exc:  # what a user would see as a traceback: the benchmark's finding, not its failure
        first = (str(exc).strip().splitlines() or [""])[0]
        return "FAIL", f"{type(exc).__name__}: {first[:200]}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_SAMPLES = ["make it red", "Replace the dog with TWO cats, and add a café sign!", "", "更大的 blue cube", "x" * 300]


def _open_clip_tokenizer_name(name: str, arch: dict[str, Any], folder: Path) -> str:
    """What to hand ``open_clip.get_tokenizer`` for the config that ran: the model name, or for a
    stand-in tokenizer a ``local-dir:`` folder holding it and the config (open_clip resolves the
    name's context length and tokenizer options from there, as it does for the name)."""
    source = str(arch["text_cfg"].get("hf_tokenizer_name") or "")
    tokenizer = Path(source)
    if not source or not tokenizer.is_dir():
        return name
    local = folder / "open_clip-tokenizer"
    shutil.copytree(tokenizer, local)
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch}), encoding="utf-8")
    return f"local-dir:{local}"


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
        wanted = name.removeprefix("local-dir:") if name.startswith("local-dir:") else \
            open_clip.get_model_config(name)["text_cfg"].get("hf_tokenizer_name", "CLIP BPE")
        return "FAIL", f"tokens: the runtime's ids differ from open_clip's tokenizer ({wanted})"
    return "pass", ""


def run(*, out_dir: Path, quick: bool, offline_standins: str = "auto", hub_only: bool = False, shard: str = "1/1") -> BenchResult:
    """The coverage table. ``offline_standins``: ``auto`` (on where the Hub cannot be reached), ``on`` or
    ``off``; ``hub_only``: only the names whose tokenizer or text tower is a Hub id; ``shard`` ``I/N``:
    every N-th name from the I-th (to spread the run over processes)."""
    import open_clip
    from tqdm import tqdm

    from compir.data.synth import SynthConfig
    from compir.data.synth_write import write_synthetic
    from compir.train.hub import hub_reachable

    use_standins = offline_standins == "on" or (offline_standins == "auto" and not hub_reachable())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: fail at once, not after retries
    index, count = (int(part) for part in shard.split("/"))
    work = out_dir / f"coverage-work-{index}of{count}"
    shutil.rmtree(work, ignore_errors=True)
    data, images = work / "data", work / "images"
    write_synthetic(data, seed=0, config=SynthConfig(n_train=32, n_val=8, n_test=8), workers=1)
    images.mkdir()
    for path in sorted((data / "images").glob("*.png"))[:8]:
        shutil.copy(path, images / path.name)
    standins = build_standins(work / "standins") if use_standins else None
    names = open_clip.list_models()
    configs = {name: open_clip.get_model_config(name) for name in names}
    families = {name: _family_or_error(configs[name]) for name in names}
    if hub_only:
        names = [name for name in names if hub_ids(configs[name]) and families[name] != "coca"]
    if quick:
        firsts: dict[str, str] = {}
        for name in names:
            firsts.setdefault(families[name], name)
        names = list(firsts.values())
    names = names[index - 1::count]
    rows: list[list[Any]] = []
    for name in tqdm(names, desc="open_clip models", unit="model"):
        started = time.perf_counter()
        vocabulary = (standin_label(configs[name]) if standins is not None else "") or "real"
        result, detail = _isolated(name, work=work, data=data, images=images, standins=standins)
        rows.append([name, families[name], result, vocabulary, detail, round(time.perf_counter() - started, 1)])
        tqdm.write(" | ".join(str(cell) for cell in rows[-1]))  # an hour-long run shows its findings as it goes
    shutil.rmtree(work, ignore_errors=True)
    passed = sum(row[2] == "pass" for row in rows)
    on_standins = sum(row[2] == "pass" and row[3] != "real" for row in rows)
    by_family: dict[str, list[int]] = {}
    for row in rows:
        counts = by_family.setdefault(row[1], [0, 0])
        counts[0] += row[2] == "pass"
        counts[1] += 1
    table = markdown_table(["model", "family", "result", "vocabulary", "reason", "s"], rows)
    summary = markdown_table(["family", "pass", "names"], [[name, p, n] for name, (p, n) in sorted(by_family.items())])
    mode = (f"offline stand-ins: {'on' if use_standins else 'off'} ({offline_standins})"
            + ("; hub-only" if hub_only else "") + (f"; shard {shard}" if count > 1 else ""))
    notes = (f"**{passed} of {len(rows)} open_clip {open_clip.__version__} model names pass** train -> export fp32 -> index -> search"
             f" ({on_standins} of them on a stand-in vocabulary / text tower, not the real one). {mode}.")
    return BenchResult(
        name=NAME if count == 1 else f"{NAME}-{index}of{count}",  # shards in one folder keep one record each
        figures={"passed": passed, "passed_on_standins": on_standins, "total": len(rows), "open_clip": open_clip.__version__,
                 "offline_standins": use_standins, "hub_only": hub_only, "shard": shard, "by_family": by_family,
                 "rows": [dict(zip(("model", "family", "result", "vocabulary", "reason", "seconds"), row, strict=True)) for row in rows]},
        table=f"{summary}\n\n{table}\n\n{notes}",
        notes=notes,
    )


def _isolated(name: str, *, work: Path, data: Path, images: Path, standins: dict[str, Path] | None) -> tuple[str, str]:
    """:func:`check_name` in a forked process: a native crash (the shrunk FastViTs of MobileCLIP*-S*
    now and then crash in torch's CPU backward here) is that name's finding, not the end of the run."""
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(check_name, name, work=work, data=data, images=images, standins=standins).result()
        except concurrent.futures.process.BrokenProcessPool:
            shutil.rmtree(work / name, ignore_errors=True)
            return "FAIL", "the process crashed (a native fault, e.g. a segmentation fault)"


def _family_or_error(arch: dict[str, Any]) -> str:
    try:
        return family(arch)
    except Exception as exc:  # e.g. timm too old to know a tower
        return f"unknown ({type(exc).__name__})"


def add_arguments(group: Any) -> None:
    """This benchmark's options (``compir bench coverage ...`` and ``python -m benchmarks.bench_coverage ...``)."""
    group.add_argument("--offline-standins", choices=("auto", "on", "off"), default="auto",
                       help="coverage: local stand-ins for Hub tokenizers / text towers (default auto: on where the Hub cannot be reached)")
    group.add_argument("--hub-only", action="store_true", help="coverage: only the names whose tokenizer or text tower is a Hub id")
    group.add_argument("--shard", default="1/1", metavar="I/N", type=_shard, help="coverage: every N-th name from the I-th (default 1/1)")


def _shard(value: str) -> str:
    parts = value.split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
        raise argparse.ArgumentTypeError(f"{value!r}: expected I/N with 1 <= I <= N, e.g. 1/3")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_coverage``: this benchmark alone, with its options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_coverage", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m benchmarks.bench_coverage --hub-only            # Hub-tokenizer names, stand-ins if offline\n"
               "  python -m benchmarks.bench_coverage --shard 2/3 --out cov2   # a third of all names\n"
               "  python -m benchmarks.bench_coverage --offline-standins off  # Hub names refused when offline")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default: bench-results/)")
    parser.add_argument("--quick", action="store_true", help="the first name of each family only")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Through the runner: the same record (format compir.bench, machine, table) as `compir bench coverage`.
    from benchmarks.runner import BenchModule, run_benchmark

    options = {"offline_standins": args.offline_standins, "hub_only": args.hub_only, "shard": args.shard}
    result = run_benchmark(BenchModule(NAME, DESCRIPTION, sys.modules[__name__]), out_dir=args.out, quick=args.quick,
                           machine=machine_info(), options=options)
    print(result.table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
