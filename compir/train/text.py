"""Text tokenization: open_clip's CLIP BPE tokenizer, and the settings the export records."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from compir.contracts import sha256_file


def tokenize(texts: Sequence[str], *, context_length: int) -> torch.Tensor:
    """(B,) texts -> (B, context_length) int64 token ids: SOT, BPE tokens, EOT, zero padding.

    Texts longer than the context are truncated with EOT kept last (open_clip's rule).
    """
    from open_clip.tokenizer import tokenize as clip_tokenize

    return clip_tokenize(list(texts), context_length=context_length)


def vocab_path() -> Path:
    """The gzipped BPE vocabulary open_clip's tokenizer uses (the export copies it)."""
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


@lru_cache(maxsize=1)
def _vocab_sha256() -> str:
    return sha256_file(vocab_path())


def tokenizer_settings(*, context_length: int) -> dict[str, Any]:
    """What a torch-free runtime needs to reproduce :func:`tokenize` (see TokenizerSpec)."""
    from open_clip.tokenizer import _tokenizer

    return {
        "kind": "clip_bpe",
        "context_length": int(context_length),
        "sot_id": int(_tokenizer.sot_token_id),
        "eot_id": int(_tokenizer.eot_token_id),
        "pad_id": 0,
        "clean": "lower",
        "vocab_sha256": _vocab_sha256(),
    }
