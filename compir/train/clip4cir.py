"""Import CLIP4Cir's released checkpoints (Baldrati et al.) as a compir checkpoint.

CLIP4Cir saves two files with ``torch.save``: the fine-tuned CLIP, ``{"CLIP": state_dict}`` (OpenAI's
``clip`` package, so OpenAI / open_clip key names), and the combiner, ``{"Combiner": state_dict}``
(keys ``text_projection_layer``, ``image_projection_layer``, ``combiner_layer``, ``output_layer``,
``dynamic_scalar.0`` / ``.3``; the dropouts have none). Either may carry an ``"epoch"`` entry.

The compir checkpoint gets the combiner head in the authors' form (``form="clip4cir"``: raw CLIP
features, text-then-image concatenation), its projection and hidden widths read from the file,
QuickGELU (OpenAI's weights were trained with it) and the authors' preprocessing (target-pad
1.25 by default). ``compir export onnx`` and the runtime take it unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compir.errors import InputError
from compir.manifest import CLIP4CIR_TARGET_RATIO
from compir.train.checkpoint import LOAD_ERRORS, save_checkpoint
from compir.train.config import ModelConfig, resolve_model_config
from compir.train.model import CIRModel

# CLIP4Cir's --transform choices -> compir preprocessing ("squarepad" is target-pad at ratio 1).
TRANSFORMS = ("targetpad", "squarepad", "clip")
# Their key -> compir's CombinerHead key (see compir.train.heads.combiner's docstring).
COMBINER_KEYS = {
    "text_projection_layer": "text_projection.0",
    "image_projection_layer": "image_projection.0",
    "combiner_layer": "residual.0",
    "output_layer": "residual.3",
    "dynamic_scalar.0": "gate.0",
    "dynamic_scalar.3": "gate.3",
}
_DROPOUT = 0.5  # their Combiner's (every dropout layer)
# Attributes of OpenAI's JIT archives that some conversions leave in a state dict (not weights).
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class ImportedCheckpoint:
    path: Path
    config: ModelConfig
    projection_dim: int
    hidden_dim: int


def import_clip4cir(
    *,
    clip_path: str | os.PathLike[str],
    combiner_path: str | os.PathLike[str],
    model: str,
    out: str | os.PathLike[str],
    transform: str = "targetpad",
    target_ratio: float = CLIP4CIR_TARGET_RATIO,
    overwrite: bool = False,
) -> ImportedCheckpoint:
    """Write a compir checkpoint at ``out`` from CLIP4Cir's two files.

    ``model``: the CLIP architecture the files were trained with (an open_clip name such as
    ``RN50x4``, or a compir model config; its head is replaced). ``transform`` / ``target_ratio``:
    the preprocessing they were trained with (their ``--transform`` and ``--target-ratio``).
    Raises InputError naming the file and what does not fit: a wrong container, missing or
    unexpected keys, shapes that do not match ``model``.
    """
    target = Path(out)
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists; pass --overwrite to replace it")
    if transform not in TRANSFORMS:
        raise InputError(f"--transform must be one of {TRANSFORMS}, got {transform!r}")
    if transform == "targetpad" and not target_ratio >= 1.0:
        raise InputError(f"--target-ratio must be >= 1, got {target_ratio}")
    clip_state = _read_state_dict(Path(clip_path), key="CLIP")
    combiner_state = _read_state_dict(Path(combiner_path), key="Combiner")
    base = resolve_model_config(model)
    head_weights, projection_dim, hidden_dim = _map_combiner(combiner_state, embed_dim=base.embed_dim, source=str(combiner_path))
    config = _imported_config(base, projection_dim=projection_dim, hidden_dim=hidden_dim, transform=transform, target_ratio=target_ratio)
    imported = CIRModel(config)
    backbone = _backbone_weights(clip_state, expected=imported.backbone.state_dict(), model=model, source=str(clip_path))
    imported.load_state_dict({**{f"backbone.{k}": v for k, v in backbone.items()}, **{f"head.{k}": v for k, v in head_weights.items()}})
    save_checkpoint(target, model=imported.eval(), metrics={}, step=0, epoch=0)
    return ImportedCheckpoint(path=target, config=imported.config, projection_dim=projection_dim, hidden_dim=hidden_dim)


def _read_state_dict(path: Path, *, key: str) -> dict[str, torch.Tensor]:
    """The ``{key: state_dict}`` CLIP4Cir's ``save_model`` writes, as float32 tensors."""
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as exc:
        raise InputError(f"{path} is not a torch.save file of tensors ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(record, dict) or key not in record:
        found = sorted(map(str, record))[:5] if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{path}: expected CLIP4Cir's {{'{key}': state_dict}} (their save_model), found {found}")
    state = record[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: {key!r} is not a state dict of tensors")
    prefix = "module."  # saved from a DataParallel-wrapped model
    return {
        (k[len(prefix):] if k.startswith(prefix) else k): (v.float() if v.is_floating_point() else v)
        for k, v in state.items()
    }


def _map_combiner(state: dict[str, torch.Tensor], *, embed_dim: int, source: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Their Combiner's 12 tensors -> compir head keys; the projection and hidden widths from the shapes."""
    expected = {f"{layer}.{kind}" for layer in COMBINER_KEYS for kind in ("weight", "bias")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise InputError(f"{source}: not CLIP4Cir's Combiner (missing keys {missing[:6]}, unexpected keys {unexpected[:6]})")
    projection_dim, feature_dim = state["text_projection_layer.weight"].shape
    hidden_dim = state["combiner_layer.weight"].shape[0]
    shapes = {  # (out, in) of each Linear
        "text_projection_layer": (projection_dim, embed_dim),
        "image_projection_layer": (projection_dim, embed_dim),
        "combiner_layer": (hidden_dim, 2 * projection_dim),
        "output_layer": (embed_dim, hidden_dim),
        "dynamic_scalar.0": (hidden_dim, 2 * projection_dim),
        "dynamic_scalar.3": (1, hidden_dim),
    }
    if feature_dim != embed_dim:
        raise InputError(f"{source}: the Combiner takes {feature_dim}-d CLIP features, the model's embedding is {embed_dim}-d: "
                         f"check --model")
    for layer, shape in shapes.items():
        weight, bias = state[f"{layer}.weight"], state[f"{layer}.bias"]
        if tuple(weight.shape) != shape or tuple(bias.shape) != shape[:1]:
            raise InputError(f"{source}: {layer} has weight {tuple(weight.shape)} / bias {tuple(bias.shape)}, "
                             f"expected {shape} / {shape[:1]} (projection {projection_dim}, hidden {hidden_dim})")
    mapped = {f"{ours}.{kind}": state[f"{theirs}.{kind}"] for theirs, ours in COMBINER_KEYS.items() for kind in ("weight", "bias")}
    return mapped, int(projection_dim), int(hidden_dim)


def _imported_config(base: ModelConfig, *, projection_dim: int, hidden_dim: int, transform: str, target_ratio: float) -> ModelConfig:
    preprocess: dict[str, Any] = {k: v for k, v in base.preprocess.items() if k not in ("resize_mode", "target_ratio")}
    if transform == "clip":
        preprocess["resize_mode"] = "shortest"
    else:
        preprocess.update(resize_mode="targetpad", target_ratio=1.0 if transform == "squarepad" else float(target_ratio))
    return ModelConfig.from_dict(
        {
            "name": f"clip4cir-{base.name}",
            # OpenAI's weights were trained with QuickGELU; an inline architecture carries the flag.
            "clip_cfg": {**base.clip_cfg, "quick_gelu": True},
            "clip_name": "",
            "head": "combiner",
            "head_options": {"projection_dim": projection_dim, "hidden_dim": hidden_dim, "dropout": _DROPOUT,
                             "form": "clip4cir", "stage": "combiner"},
            "loss_weights": {"composed": 1.0},
            "preprocess": preprocess,
            "description": f"imported from CLIP4Cir checkpoints ({base.name} CLIP, their combiner)",
        },
        source="imported CLIP4Cir model config",
    )


def _backbone_weights(
    state: dict[str, torch.Tensor], *, expected: dict[str, torch.Tensor], model: str, source: str
) -> dict[str, torch.Tensor]:
    """OpenAI / open_clip CLIP keys -> the backbone's (text tower under ``text.``), checked key by key."""
    from open_clip.model import convert_to_custom_text_state_dict

    state = convert_to_custom_text_state_dict({k: v for k, v in state.items() if k not in _NOT_WEIGHTS})
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"{source}: this CLIP state dict is not a {model} (missing {len(missing)} keys, e.g. {missing[:3]}; "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:3]}): pass the --model it was trained with"
        )
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise InputError(f"{source}: {key} has shape {tuple(state[key].shape)}, a {model} has {tuple(value.shape)}: "
                             f"pass the --model it was trained with")
    return state
