"""Pretrained weights as compir builds a model from them: the activation they were trained with, and
OpenAI's TorchScript archives read as plain state dicts (open_clip's loader refuses TorchScript)."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from compir.errors import InputError
from compir.train.config import ModelConfig


def resolve_activation(config: ModelConfig, pretrained: str | None) -> tuple[ModelConfig, str]:
    """``config`` with the activation ``pretrained``'s weights were trained with, and why (one line).

    OpenAI's CLIP weights (and every tag open_clip marks ``quick_gelu``) were trained with QuickGELU;
    building them with GELU runs but silently degrades every feature. A pretrained tag decides by
    open_clip's record of it, a local TorchScript archive (OpenAI's release format) means QuickGELU,
    and otherwise (no weights, an open_clip-format file) the config's own choice stands: name a
    ``-quickgelu`` model for such a file. The choice is stored in the config (so in checkpoints).
    """
    if pretrained is None:
        return config, ""
    quick = bool(config.clip_cfg.get("quick_gelu", False))
    if Path(pretrained).is_file():
        if not is_torchscript_archive(Path(pretrained)):
            return config, ""
        trained, why = True, "OpenAI TorchScript weights are QuickGELU-trained"
    else:
        import open_clip

        tag = open_clip.get_pretrained_cfg(config.clip_name, pretrained) if config.clip_name else {}
        if not tag:
            known = open_clip.list_pretrained_tags_by_model(config.clip_name) if config.clip_name else []
            raise InputError(
                f"--pretrained {pretrained!r} is neither a file nor a pretrained tag of {config.clip_name or config.name!r}"
                + (f" (tags: {', '.join(known)})" if known else " (only open_clip-named models have tags)")
            )
        trained = bool(tag.get("quick_gelu", False))
        why = f"pretrained {pretrained!r} was trained with {'QuickGELU' if trained else 'GELU'}"
    if trained != quick:
        why += f"; the config's {'QuickGELU' if quick else 'GELU'} overridden"
    return dataclasses.replace(config, clip_cfg={**config.clip_cfg, "quick_gelu": trained}), why


def is_torchscript_archive(path: Path) -> bool:
    """A ``torch.jit.save`` archive (OpenAI's CLIP releases) rather than a pickled state dict."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# Entries of OpenAI's TorchScript state dicts that are settings, not weights.
_OPENAI_SETTINGS = ("input_resolution", "context_length", "vocab_size")


@contextlib.contextmanager
def weights_file(pretrained: str | None) -> Iterator[str | None]:
    """``pretrained`` as open_clip's loader takes it: a TorchScript archive becomes a plain state dict.

    open_clip loads files with ``torch.load(weights_only=True)``, which refuses TorchScript; the
    archive's weights are read with ``torch.jit.load`` (TorchScript code, not pickled Python) and
    handed over as a temporary state-dict file.
    """
    if pretrained is None or not Path(pretrained).is_file() or not is_torchscript_archive(Path(pretrained)):
        yield pretrained
        return
    try:
        state = torch.jit.load(pretrained, map_location="cpu").state_dict()
    except RuntimeError as exc:
        raise InputError(f"--pretrained {pretrained}: unreadable TorchScript archive ({str(exc).splitlines()[0]})") from exc
    with tempfile.TemporaryDirectory(prefix="compir-weights-") as folder:
        path = Path(folder) / "state_dict.pt"
        torch.save({k: v.float() for k, v in state.items() if k not in _OPENAI_SETTINGS}, path)
        del state
        yield str(path)
