"""Training checkpoints: one ``torch.save`` file that rebuilds the model on its own.

Layout (a dict, loaded with ``weights_only=True`` so a checkpoint cannot run code)::

    format, schema_version, compir_version,
    model_config      ModelConfig.to_dict() (architecture, head, loss weights, preprocessing)
    preprocess        PreprocessSpec fields (what the export copies into its manifest)
    tokenizer         TextTokenizer.settings(): kind, context_length, sot_id, eot_id, pad_id, clean, vocab_sha256[, strip_sep_id]
    state_dict        unwrapped (never DDP-prefixed) model weights
    metrics, step, epoch
    optimizer_state   optional: optimizer / scheduler / loop state for --resume
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compir import __version__
from compir.contracts import CHECKPOINT_FORMAT, CHECKPOINT_SCHEMA, atomic_output_path, check_header, require_keys, sha256_file
from compir.errors import CompirError, ContractError
from compir.manifest import PreprocessSpec
from compir.train.config import ModelConfig
from compir.train.model import CIRModel

# What torch.load(weights_only=True) raises on a file that is not a torch.save archive of tensors.
LOAD_ERRORS = (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError)
_REQUIRED = ["model_config", "preprocess", "tokenizer", "state_dict", "metrics", "step", "epoch"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: CIRModel  # in eval mode, on map_location
    config: ModelConfig
    preprocess: PreprocessSpec
    tokenizer: dict[str, Any]
    metrics: dict[str, float]
    step: int
    epoch: int
    optimizer_state: dict[str, Any] | None
    sha256: str
    path: Path


def unwrap_model(model: nn.Module) -> CIRModel:
    """The CIRModel inside a DistributedDataParallel (or torch.compile) wrapper, or the model."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, CIRModel):
        raise TypeError(f"expected a CIRModel (optionally wrapped), got {type(inner).__name__}")
    return inner


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    metrics: dict[str, float],
    step: int,
    epoch: int,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Atomically write a checkpoint of ``model`` (a CIRModel, DDP-wrapped or not)."""
    inner = unwrap_model(model)
    record = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": CHECKPOINT_SCHEMA,
        "compir_version": __version__,
        "model_config": inner.config.to_dict(),
        "preprocess": inner.preprocess.to_dict(),
        "tokenizer": inner.tokenizer.settings(),
        "state_dict": {key: value.detach().cpu() for key, value in inner.state_dict().items()},
        "metrics": {str(k): float(v) for k, v in metrics.items()},
        "step": int(step),
        "epoch": int(epoch),
        "optimizer_state": optimizer_state,
    }
    with atomic_output_path(path) as tmp:
        torch.save(record, tmp)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint file; ContractError if it is not a usable checkpoint."""
    source = Path(path)
    if not source.is_file():
        raise ContractError(f"checkpoint {source} does not exist; train one with `compir train`")
    record = _read_record(source, map_location)
    check_header(record, fmt=CHECKPOINT_FORMAT, schema_version=CHECKPOINT_SCHEMA, source=str(source))
    require_keys(record, _REQUIRED, source=str(source))
    try:
        config = ModelConfig.from_dict(record["model_config"], source=f"{source} model_config")
        model = CIRModel(config)
        model.load_state_dict(record["state_dict"], strict=True)
        pre = record["preprocess"]
        preprocess = PreprocessSpec(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])})
    except (CompirError, RuntimeError, TypeError, KeyError) as exc:
        raise ContractError(f"checkpoint {source} does not match its own model config ({exc}); re-create it") from exc
    model.to(map_location).eval()
    return LoadedCheckpoint(
        model=model,
        config=model.config,
        preprocess=preprocess,
        tokenizer=dict(record["tokenizer"]),
        metrics={str(k): float(v) for k, v in record["metrics"].items()},
        step=int(record["step"]),
        epoch=int(record["epoch"]),
        optimizer_state=record.get("optimizer_state"),
        sha256=sha256_file(source),
        path=source,
    )


def _read_record(source: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except LOAD_ERRORS as exc:
        raise ContractError(
            f"checkpoint {source} is damaged or not a compir checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
            f"re-create it with `compir train`"
        ) from exc
