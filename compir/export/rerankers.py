"""Put a checkpoint's stage-2 re-rankers into its export folder (NEUCORE graph, MMRef matrices).

``add_rerankers(export_dir, checkpoint=...)`` reads the sidecars beside the checkpoint
(``<stem>.neucore.pt``, ``<stem>.mmref.pt``; see :mod:`compir.train.neucore.stage2`) and adds:

- ``fp32/reranker.onnx`` (role ``reranker``): ``token_features`` (N, S, Wt), ``input_ids`` (N, S),
  ``reference_features`` (N, *F), ``candidate_features`` (N, *F) -> ``scores`` (N,); the batch axis
  is the candidate axis (the runtime repeats the query's rows). S, the ``sequence`` axis, is
  dynamic: the runtime packs a text's concept positions (:func:`compir.concepts.pack_concepts`) and
  the progressive fusion is an ONNX ``Loop`` over them (its scripted :class:`ProgressiveFusion`),
  so a query pays for its concepts, not for the context length. Checked against torch (fp32
  parity, max abs <= tolerance, batch 1 and N); every variant lists the same fp32 file. A NEUCORE
  trained with image regions (``region_grid``) needs them in the image encoder's ``image_features``
  (:func:`neucore_region_grid`: ``export_onnx`` sets them), so the index caches them;
- ``mmref_references.npy`` (M, D) and ``mmref_projection.npy`` (D, D): artifacts with sha256;
- ``rerankers.json`` (format ``compir.rerankers``): the settings chosen on validation (mix
  weights, MMRef temperature, top-N), also an artifact.

The manifest is rewritten (atomically) and read back. Call it before building an index: the
index records the manifest's checksum.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compir.concepts import PAD_ID, pack_concepts
from compir.contracts import atomic_write_bytes, sha256_file, write_contract
from compir.errors import ContractError
from compir.export.graphs import GraphDef, export_graph, graph_spec
from compir.export.parity import FP32_TOLERANCE, check_fp32_parity
from compir.export.samples import load_samples
from compir.manifest import IMAGE_ENCODER, RERANKER, ArtifactSpec, ExportManifest, GraphSpec, load_manifest, save_manifest

RERANKERS_FORMAT = "compir.rerankers"
RERANKERS_SCHEMA = 1
RERANKERS_FILE = "rerankers.json"
REFERENCES_FILE = "mmref_references.npy"
PROJECTION_FILE = "mmref_projection.npy"
RERANKER_INPUTS = ("token_features", "input_ids", "reference_features", "candidate_features")
_PARITY_ROWS = 6
log = logging.getLogger(__name__)


def add_rerankers(
    export_dir: str | Path,
    *,
    checkpoint: str | Path,
    neucore: str | Path | None = None,
    mmref: str | Path | None = None,
    calibration_data: str | Path | None = None,
    opset: int = 17,
    tolerance: float = FP32_TOLERANCE,
    keep_unapplied: bool = False,
) -> ExportManifest:
    """Add the re-rankers trained for ``checkpoint`` to its export; a sidecar not given is looked
    up beside the checkpoint and skipped when absent. Returns the (re-read) manifest.

    A NEUCORE whose validated weight is 0 is recorded at weight 0 without its graph (the runtime
    skips it, and its image regions would enlarge every index item), unless ``keep_unapplied``.

    ContractError when the export is of another checkpoint, a sidecar was trained on another
    checkpoint, or the reranker graph fails its parity check.
    """
    from compir.train.checkpoint import load_checkpoint
    from compir.train.neucore.stage2 import load_sidecar, sidecar_path

    folder = Path(export_dir)
    manifest = load_manifest(folder)
    given = {"neucore": neucore, "mmref": mmref}
    paths = {kind: Path(p) if p is not None else sidecar_path(checkpoint, kind) for kind, p in given.items()}
    paths = {kind: path for kind, path in paths.items() if given[kind] is not None or path.is_file()}
    if not paths:
        return manifest  # no re-ranker trained for this checkpoint: the export stays as it is
    loaded = load_checkpoint(checkpoint)
    if manifest.source_checkpoint_sha256 and manifest.source_checkpoint_sha256 != loaded.sha256:
        raise ContractError(f"export {folder} was made from another checkpoint than {checkpoint}; export this checkpoint first")
    settings: dict[str, Any] = {}
    graphs: dict[str, GraphSpec] = {}
    artifacts = dict(manifest.artifacts)
    parity: dict[str, float] = {}
    for kind, path in paths.items():
        sidecar = load_sidecar(path, kind=kind, checkpoint_sha256=loaded.sha256)
        settings[kind] = dict(sidecar.settings)
        if kind == "neucore" and not (keep_unapplied or _applied(sidecar.settings)):
            # It did not help on validation: the runtime skips it, so neither its graph nor its
            # image regions (cached per gallery item) are worth exporting.
            log.info("NEUCORE's validated weight is 0: the export leaves out its graph and image regions")
            settings[kind] = {"weight": 0.0, "left_out": "validated weight 0"}
        elif kind == "neucore":
            spec, parity[RERANKER] = _export_neucore(folder, manifest, sidecar.config, sidecar.state_dict, loaded=loaded,
                                                     calibration_data=calibration_data, opset=opset, tolerance=tolerance)
            graphs[RERANKER] = spec
            settings[kind] |= {"graph": RERANKER, "region_grid": int(sidecar.config.get("region_grid", 0))}
        else:
            arrays = (("mmref_references", REFERENCES_FILE, "references"), ("mmref_projection", PROJECTION_FILE, "projection"))
            for name, file, key in arrays:
                artifacts[name] = _write_array(folder / file, sidecar.state_dict[key].numpy(), description=f"MMRef {key}")
            settings[kind] |= {"references": "mmref_references", "projection": "mmref_projection"}
    write_contract(folder / RERANKERS_FILE, fmt=RERANKERS_FORMAT, schema_version=RERANKERS_SCHEMA, body={"rerankers": settings})
    artifacts["rerankers"] = ArtifactSpec(file=RERANKERS_FILE, sha256=sha256_file(folder / RERANKERS_FILE), description="stage-2 settings")
    variants = {
        name: dataclasses.replace(
            variant, graphs={**variant.graphs, **graphs}, parity={**variant.parity, **(parity if name == "fp32" else {})}
        )
        for name, variant in manifest.variants.items()
    }
    save_manifest(folder, dataclasses.replace(manifest, variants=variants, artifacts=artifacts))
    return load_manifest(folder)


def neucore_region_grid(checkpoint: str | Path, sidecar: str | Path | None = None, *, keep_unapplied: bool = False) -> int:
    """The image-region grid the NEUCORE sidecar of ``checkpoint`` was trained with (0: none, no
    sidecar, or a validated weight of 0, where the runtime does not apply NEUCORE, unless ``keep_unapplied``)."""
    from compir.train.neucore.stage2 import load_sidecar, sidecar_path

    path = Path(sidecar) if sidecar is not None else sidecar_path(checkpoint, "neucore")
    if not path.is_file():
        return 0
    loaded = load_sidecar(path, kind="neucore")
    return int(loaded.config.get("region_grid", 0)) if keep_unapplied or _applied(loaded.settings) else 0


def _applied(settings: dict[str, Any]) -> bool:
    """Whether the runtime applies a re-ranker: its validation-chosen weight is above 0."""
    return float(settings.get("weight", 0.0)) > 0


def _check_regions(folder: Path, manifest: ExportManifest, features: np.ndarray, grid: int) -> None:
    """The export's image encoder must give the image features NEUCORE was trained on (its regions)."""
    exported = tuple(manifest.graph(IMAGE_ENCODER, "fp32").output("image_features").shape[1:])
    if exported != features.shape[1:]:
        raise ContractError(
            f"export {folder}: its image encoder gives image_features {exported}, the NEUCORE re-ranker (region grid {grid}) "
            f"needs {features.shape[1:]}; export the checkpoint again with its NEUCORE sidecar beside it, then rebuild the index"
        )


def _write_array(path: Path, array: np.ndarray, *, description: str) -> ArtifactSpec:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())
    return ArtifactSpec(file=path.name, sha256=sha256_file(path), description=description)


def _export_neucore(folder: Path, manifest: ExportManifest, config: dict[str, Any], state: dict[str, torch.Tensor], *, loaded: Any,
                    calibration_data: str | Path | None, opset: int, tolerance: float) -> tuple[GraphSpec, float]:
    from compir.train.neucore.model import NeucoreConfig, NeucoreScorer

    scorer = NeucoreScorer(NeucoreConfig(**config))
    scorer.load_state_dict(state, strict=True)
    scorer.eval()
    loaded.model.use_image_regions(scorer.config.region_grid)
    feeds = _reranker_feeds(loaded, calibration_data=calibration_data)
    _check_regions(folder, manifest, feeds["reference_features"], scorer.config.region_grid)
    defn = GraphDef(role=RERANKER, module=_LoopedScorer(scorer).eval(), input_names=RERANKER_INPUTS, output_names=("scores",),
                    sequence_names=("token_features", "input_ids"))
    path = folder / "fp32" / f"{RERANKER}.onnx"
    export_graph(defn, feeds=feeds, path=path, opset=opset)
    worst = check_fp32_parity(defn, path=path, feeds=feeds, tolerance=tolerance)
    return graph_spec(RERANKER, path, root=folder), worst


class _LoopedScorer(torch.nn.Module):
    """The scorer with its progressive fusion scripted: the exported graph loops over the positions
    it is given (the ``sequence`` axis is dynamic) and computes what the scorer computes."""

    def __init__(self, scorer: Any) -> None:
        from compir.train.neucore.model import ProgressiveFusion

        super().__init__()
        self.scorer = scorer
        with warnings.catch_warnings():  # TorchScript is deprecated, like the ONNX exporter that reads it (graphs.py)
            warnings.simplefilter("ignore", FutureWarning)
            self.fusion = torch.jit.script(ProgressiveFusion(scorer.block))

    def forward(self, token_features: torch.Tensor, input_ids: torch.Tensor, reference_features: torch.Tensor,
                candidate_features: torch.Tensor) -> torch.Tensor:
        return self.scorer.run(token_features, input_ids, reference_features, candidate_features, fusion=self.fusion).scores


def _reranker_feeds(loaded: Any, *, calibration_data: str | Path | None) -> dict[str, np.ndarray]:
    """Real rows: sample texts' token states packed to the graph's concept positions (every word a
    concept), sample images as references, other samples as candidates."""
    model = loaded.model.eval()
    samples = load_samples(preprocess=loaded.preprocess, tokenizer=model.tokenizer, data_dir=calibration_data,
                           count=_PARITY_ROWS)
    with torch.no_grad():
        _, features, _ = model.encode_image(torch.from_numpy(samples.pixel_values))
        _, _, tokens = model.encode_text(torch.from_numpy(samples.input_ids))
    features = features.float().numpy()
    states, ids = tokens.float().numpy(), samples.input_ids.astype(np.int64)
    slots = int((ids[:, ids.shape[1] - states.shape[1]:] != PAD_ID).sum(axis=1).max())  # the longest text's positions
    packed = [pack_concepts(row, row_ids, slots=slots) for row, row_ids in zip(states, ids, strict=True)]
    return {
        "token_features": np.stack([row for row, _ in packed]),
        "input_ids": np.stack([row_ids for _, row_ids in packed]),
        "reference_features": features,
        "candidate_features": np.roll(features, 1, axis=0),
    }
