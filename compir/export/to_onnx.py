"""``export_onnx``: a checkpoint -> a self-contained export folder.

Layout (see :mod:`compir.manifest`)::

    manifest.json            graphs, I/O contracts, preprocessing, tokenizer, parity, accuracy
    vocab.bpe.txt.gz         the tokenizer's vocabulary, checksummed: CLIP's BPE merges, or
    tokenizer.json           a Hugging Face tokenizer as open_clip runs it (SigLIP, HF text towers)
    <variant>/<role>.onnx    fp32 / fp16 / int8-dynamic / int8-static / int8-static-u8 graphs
    <variant>/<role>.onnx.data  a big graph's weights (ONNX external data, past ``external_data_bytes``)

The split graphs (image encoder, text encoder, composer) are what the runtime runs; the fused
``query_encoder`` (all three in one graph: as big as the model) is written only with ``fused=True``.
A zero-shot model (textual inversion: Pic2Word) has ``token_mapper`` and ``prompt_encoder`` graphs in
place of the composer, and its manifest records the prompt template (:mod:`compir.composition`).

The folder is written to a temporary sibling and renamed at the end, so a failing parity check
(or any other error) leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from compir import __version__
from compir.composition import CompositionSpec, check_prompt_ids
from compir.contracts import atomic_output_dir
from compir.data.types import CirSplit
from compir.errors import ContractError
from compir.export.external_data import EXTERNAL_DATA_BYTES
from compir.export.graphs import GraphDef, export_graph, graph_defs, graph_inputs, graph_spec, run_torch, select_batch
from compir.export.parity import FP32_TOLERANCE, check_fp32_graph, mean_cosine, open_session, run_session
from compir.export.samples import Samples, load_samples
from compir.export.variants import VARIANTS, convert_fp16, quantize_int8_dynamic, quantize_int8_static
from compir.manifest import (
    IMAGE_ENCODER,
    PROMPT_ENCODER,
    TEXT_ENCODER,
    TOKEN_MAPPER,
    ExportManifest,
    TokenizerSpec,
    VariantSpec,
    load_manifest,
    save_manifest,
)
from compir.prompts import DEFAULT_TEMPLATE, PLACEHOLDER

PARITY_SAMPLES = 4  # parity runs at batch 1 and batch 4
MIN_VARIANT_COSINE = 0.95  # below this a reduced-precision graph is broken, not merely lossy
# The embedding each graph is judged by when comparing variants.
_KEY_OUTPUT = {"image_encoder": "image_embeds", "text_encoder": "text_embeds", "composer": "query_embeds", "query_encoder": "query_embeds",
               TOKEN_MAPPER: "pseudo_tokens", PROMPT_ENCODER: "query_embeds"}


def export_onnx(
    checkpoint: str | Path,
    *,
    out_dir: str | Path,
    variants: Sequence[str] = ("fp32",),
    calibration_data: str | Path | None = None,
    calibration_count: int = 32,
    eval_data: str | Path | None = None,
    eval_split: str = "test",
    opset: int = 17,
    tolerance: float = FP32_TOLERANCE,
    fused: bool = False,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    overwrite: bool = False,
    keep_unapplied: bool = False,
    prompt_template: str | None = None,
    before_publish: Callable[[Path, ExportManifest], None] | None = None,
) -> ExportManifest:
    """Export a checkpoint's graphs to ONNX, check them against torch, write the manifest.

    ``calibration_data``: a dataset root or an image folder whose images (and query texts) feed the
    parity checks and static int8 calibration; rendered synthetic scenes when None.
    ``eval_data``: a dataset root; each variant's recall on ``eval_split`` is recorded.
    ``fused``: also write the fused ``query_encoder`` graph (the runtime does not use it).
    ``external_data_bytes``: graphs whose weights exceed this are written with ONNX external data.
    ``keep_unapplied``: also export a NEUCORE whose validated weight is 0 (with its image regions),
    for tools that choose the weights again (``compir bench ablation``); the runtime skips it.
    ``prompt_template``: a zero-shot export's prompt (default :data:`compir.prompts.DEFAULT_TEMPLATE`);
    InputError, before any work, when it lacks the placeholder word or holds it twice, or the model
    composes with a learned composer.
    ``before_publish``: called with the finished (still temporary) folder and its manifest; an error
    it raises leaves nothing at ``out_dir`` (``compir export onnx --strict-trt`` lints there).
    Raises ContractError on a bad checkpoint, a parity failure (naming graph and figure) or a
    broken variant; InputError-free: every input here is a file the user named.
    """
    from compir.export.rerankers import neucore_region_grid
    from compir.train.checkpoint import load_checkpoint

    chosen = _check_variants(variants)
    if opset < 17:
        raise ContractError(f"opset {opset} is too old: LayerNormalization needs opset >= 17")
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    composition = _composition(model, head=loaded.config.head, prompt_template=prompt_template)
    # NEUCORE's image regions: the index caches them with the features.
    model.use_image_regions(neucore_region_grid(checkpoint, keep_unapplied=keep_unapplied))
    context_length = int(loaded.tokenizer["context_length"])
    if model.tokenizer.context_length != context_length or model.tokenizer.kind != loaded.tokenizer.get("kind", "clip_bpe"):
        raise ContractError(f"{checkpoint}: its tokenizer record {loaded.tokenizer} does not match its model config")
    samples = load_samples(
        preprocess=loaded.preprocess,
        tokenizer=model.tokenizer,
        data_dir=calibration_data,
        count=max(calibration_count, PARITY_SAMPLES),
    )
    defs = graph_defs(model, fused=fused)
    roles = [d.role for d in defs]
    all_feeds = _feeds_per_graph(defs, samples, prompt_ids=_prompt_ids(model, composition, samples.texts))
    parity_feeds = {role: select_batch(feeds, range(PARITY_SAMPLES)) for role, feeds in all_feeds.items()}
    split = _eval_split(eval_data, eval_split) if eval_data is not None else None

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        vocab_file, vocab_sha = model.tokenizer.write_vocab(tmp)
        if loaded.tokenizer.get("vocab_sha256") not in (None, vocab_sha):
            raise ContractError(
                f"{checkpoint} was trained with another tokenizer vocabulary (sha256 {str(loaded.tokenizer['vocab_sha256'])[:12]}...) "
                f"than the one found now ({vocab_sha[:12]}...); export with the open_clip / tokenizer files it was trained with"
            )
        specs: dict[str, VariantSpec] = {}
        paths: dict[str, dict[str, Path]] = {}
        fp32_outputs: dict[str, dict[str, np.ndarray]] = {}
        for name in tqdm(chosen, desc="export variants", unit="variant"):
            paths[name] = {role: tmp / name / f"{role}.onnx" for role in roles}
            recipe: dict[str, Any] = {}
            if name == "fp32":
                parity, fp32_outputs = _export_fp32(
                    defs, paths[name], feeds=parity_feeds, opset=opset, tolerance=tolerance, external_data_bytes=external_data_bytes,
                    pad_id=model.pad_id,
                )
            else:
                recipe = _convert(
                    name, source=paths["fp32"], target=paths[name], calibration=all_feeds, external_data_bytes=external_data_bytes
                )
                parity = _variant_parity(name, paths[name], feeds=parity_feeds, reference=fp32_outputs)
            specs[name] = _variant_spec(name, paths[name], root=tmp, parity=parity, quantization=recipe)
        embed_dim = specs["fp32"].graph(IMAGE_ENCODER).output("image_embeds").shape[-1]
        manifest = ExportManifest(
            model_config=loaded.config.to_dict(),
            head=loaded.config.head,
            embed_dim=int(embed_dim),
            metric="cos",
            preprocess=loaded.preprocess,
            tokenizer=TokenizerSpec(
                kind=str(loaded.tokenizer["kind"]),
                vocab_file=vocab_file,
                vocab_sha256=vocab_sha,
                context_length=context_length,
                sot_id=int(loaded.tokenizer["sot_id"]),
                eot_id=int(loaded.tokenizer["eot_id"]),
                pad_id=int(loaded.tokenizer["pad_id"]),
                clean=str(loaded.tokenizer.get("clean", "lower")),
                strip_sep_id=int(loaded.tokenizer.get("strip_sep_id", -1)),
            ),
            variants=specs,
            default_variant="fp32",
            source_checkpoint_sha256=loaded.sha256,
            opset=opset,
            compir_version=__version__,
            composition=composition,
        )
        save_manifest(tmp, manifest)
        if split is not None:
            # Through the runtime (numpy preprocessing, its tokenizer, the split graphs): the path users run.
            from compir.export.accuracy import measure_accuracy

            figures = measure_accuracy(tmp, variants=list(specs), split=split)
            specs = {name: replace(spec, accuracy=figures[name]) for name, spec in specs.items()}
            save_manifest(tmp, replace(manifest, variants=specs))
        # Stage-2 re-rankers trained for this checkpoint (sidecars beside it); a no-op without them.
        from compir.export.rerankers import add_rerankers

        manifest = add_rerankers(tmp, checkpoint=checkpoint, calibration_data=calibration_data, opset=opset, tolerance=tolerance,
                                 keep_unapplied=keep_unapplied)
        load_manifest(tmp)  # the folder must read back (checksums, required graphs) before it is published
        if before_publish is not None:
            before_publish(tmp, manifest)
    return manifest


def _check_variants(variants: Sequence[str]) -> list[str]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ContractError(f"unknown export variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    # fp32 is the reference every other variant is derived from and compared to.
    return ["fp32", *[v for v in VARIANTS if v in variants and v != "fp32"]]


def _composition(model: Any, *, head: str, prompt_template: str | None) -> CompositionSpec:
    """The manifest's composition record; a zero-shot model's template checked (InputError with the reason)."""
    if model.placeholder_id is None:
        composition = CompositionSpec(kind=head)
        if prompt_template is not None:
            composition.template(prompt_template)  # refuses: a learned composer has no prompt
        return composition
    text = DEFAULT_TEMPLATE if prompt_template is None else prompt_template
    composition = CompositionSpec(kind=head, prompt_template=text, placeholder=PLACEHOLDER, placeholder_id=int(model.placeholder_id))
    composition.template()  # InputError naming what is wrong with the template
    return composition


def _prompt_ids(model: Any, composition: CompositionSpec, texts: Sequence[str]) -> np.ndarray | None:
    """(N, L) ids of the prompts the samples' texts make (zero-shot), or None."""
    if not composition.zero_shot:
        return None
    template = composition.template()
    ids = np.asarray(model.tokenizer([template.fill(text) for text in texts]), dtype=np.int64)
    check_prompt_ids(ids, placeholder_id=composition.placeholder_id, texts=texts)
    return ids


def _feeds_per_graph(defs: list[GraphDef], samples: Samples, *, prompt_ids: np.ndarray | None) -> dict[str, dict[str, np.ndarray]]:
    """Real feeds for every graph: composer (or token mapper and prompt encoder) inputs are the encoders'
    features of the samples, the prompt encoder's ids the prompts their texts make."""
    by_role = {d.role: d for d in defs}
    features = {
        "image_features": run_torch(by_role[IMAGE_ENCODER], {"pixel_values": samples.pixel_values})["image_features"],
        "text_features": run_torch(by_role[TEXT_ENCODER], {"input_ids": samples.input_ids})["text_features"],
    }
    if TOKEN_MAPPER in by_role:
        features["pseudo_tokens"] = run_torch(by_role[TOKEN_MAPPER], {"image_features": features["image_features"]})["pseudo_tokens"]
    return {
        d.role: graph_inputs(d.role, pixel_values=samples.pixel_values, input_ids=samples.input_ids, features=features,
                             prompt_ids=prompt_ids)
        for d in defs
    }


def _export_fp32(
    defs: list[GraphDef],
    paths: dict[str, Path],
    *,
    feeds: dict[str, dict[str, np.ndarray]],
    opset: int,
    tolerance: float,
    external_data_bytes: int,
    pad_id: int,
) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """Export and check every graph; returns the parity figures and each graph's outputs on ``feeds``."""
    parity: dict[str, float] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for defn in defs:
        export_graph(defn, feeds=feeds[defn.role], path=paths[defn.role], opset=opset, external_data_bytes=external_data_bytes)
        parity[defn.role], outputs[defn.role] = check_fp32_graph(
            defn, path=paths[defn.role], feeds=feeds[defn.role], pad_id=pad_id, tolerance=tolerance
        )
    return parity, outputs


def _convert(
    name: str,
    *,
    source: dict[str, Path],
    target: dict[str, Path],
    calibration: dict[str, dict[str, np.ndarray]],
    external_data_bytes: int,
) -> dict[str, Any]:
    """Write variant ``name`` of every graph; returns its quantization recipe (empty for fp16)."""
    recipe: dict[str, Any] = {}
    for role in target:
        if name == "fp16":
            convert_fp16(source[role], target[role], external_data_bytes=external_data_bytes)
        elif name == "int8-dynamic":
            recipe = quantize_int8_dynamic(source[role], target[role], external_data_bytes=external_data_bytes)
        else:
            recipe = quantize_int8_static(
                source[role], target[role], calibration=_batches(calibration[role], size=8), variant=name,
                external_data_bytes=external_data_bytes,
            )
    return recipe


def _batches(feeds: dict[str, np.ndarray], *, size: int) -> list[dict[str, np.ndarray]]:
    count = len(next(iter(feeds.values())))
    return [select_batch(feeds, range(start, min(start + size, count))) for start in range(0, count, size)]


def _variant_parity(
    name: str, paths: dict[str, Path], *, feeds: dict[str, dict[str, np.ndarray]], reference: dict[str, dict[str, np.ndarray]]
) -> dict[str, float]:
    """Cosine of each graph's key embedding to fp32 on the parity samples; broken graphs fail."""
    parity: dict[str, float] = {}
    for role, path in paths.items():
        key = _KEY_OUTPUT[role]
        cosine = mean_cosine(run_session(open_session(path), feeds[role])[key], reference[role][key])
        if not np.isfinite(cosine) or cosine < MIN_VARIANT_COSINE:
            raise ContractError(
                f"variant {name}: {role} {key} has mean cosine {cosine:.4f} to fp32 (minimum {MIN_VARIANT_COSINE}); "
                f"this variant is broken for this model, leave it out of --variants"
            )
        parity[role] = cosine
    return parity


def _variant_spec(name: str, paths: dict[str, Path], *, root: Path, parity: dict[str, float], quantization: dict[str, Any]) -> VariantSpec:
    graphs = {role: graph_spec(role, path, root=root) for role, path in paths.items()}
    return VariantSpec(name=name, graphs=graphs, parity=parity, quantization=quantization)


def _eval_split(root: str | Path, split: str) -> CirSplit:
    from compir.data.load import load_split

    return load_split(root, split=split)
