"""Textual inversion on an open_clip text tower: a prompt read with a pseudo-word token in its placeholder's place.

:func:`encode_prompt` runs the tower's own forward (open_clip's ``TextTransformer``: its embeddings, causal
mask, end-of-text pooling and projection) with one change: the token embedding at every position holding the
placeholder's id is the given pseudo token. A forward hook on the token embedding makes the change, so the
tower's code path is the one text-only search runs, and ONNX tracing records it as Equal + Where (standard
ops TensorRT's parser takes). Used by Pic2Word's training (:func:`inversion_loss`) and the export's
``prompt_encoder`` graph.
"""

from __future__ import annotations

from typing import Any

import torch

from compir.errors import InputError
from compir.prompts import PLACEHOLDER, TRAIN_PROMPT


def placeholder_id(tokenizer: Any, placeholder: str = PLACEHOLDER) -> int:
    """The placeholder word's token id: the one id between start and end of text (else an InputError)."""
    settings = tokenizer.settings()
    ids = [int(i) for i in tokenizer([placeholder])[0].tolist()]
    inner = [i for i in ids if i not in (settings["sot_id"], settings["eot_id"], settings["pad_id"])]
    if len(inner) != 1:
        raise InputError(f"the placeholder {placeholder!r} is {len(inner)} tokens in this model's tokenizer ({inner}); "
                         "textual inversion needs one token")
    return inner[0]


def check_text_tower(text_tower: Any) -> None:
    """Textual inversion needs open_clip's own text transformer (token embedding table, no appended class token)."""
    from open_clip.transformer import TextTransformer

    if not isinstance(text_tower, TextTransformer) or text_tower.cls_emb is not None:
        raise InputError(f"textual inversion (pic2word) needs an open_clip TextTransformer text tower without a class "
                         f"token; this model's is {type(text_tower).__name__}")


def encode_prompt(text_tower: Any, input_ids: torch.Tensor, pseudo_tokens: torch.Tensor, placeholder: int) -> torch.Tensor:
    """(B, L) prompt ids, (B, Wt) pseudo tokens -> the tower's pooled (B, E) output, unnormalised."""
    check_text_tower(text_tower)
    at_placeholder = (input_ids == placeholder).unsqueeze(-1)  # (B, L, 1)

    def replace(_module: Any, _inputs: Any, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.where(at_placeholder, pseudo_tokens.unsqueeze(1).to(embeddings.dtype), embeddings)

    handle = text_tower.token_embedding.register_forward_hook(replace)
    try:
        pooled, _ = text_tower(input_ids)
    finally:
        handle.remove()
    return pooled


def train_prompt_ids(tokenizer: Any, batch: int, device: torch.device) -> torch.Tensor:
    """(B, L) ids of Pic2Word's training prompt ``a photo of *``, one row per image."""
    return tokenizer([TRAIN_PROMPT]).to(device).expand(batch, -1)
