"""Text tokenization: open_clip's tokenizer of a model config, and what the export records of it.

Two kinds, chosen the way ``open_clip.get_tokenizer`` chooses:

- ``clip_bpe``: CLIP's byte-level BPE (open_clip's ``SimpleTokenizer``), every plain CLIP config;
- ``hf``: a Hugging Face tokenizer (open_clip's ``HFTokenizer``) where the config's ``text_cfg``
  names one in ``hf_tokenizer_name``: the HF text towers (xlm-roberta, mt5, bert, nllb, ...),
  SigLIP / SigLIP2 (T5 / Gemma sentencepiece vocabularies, ``clean: canonicalize``, 64 tokens)
  and CLIPA (bert, ``strip_sep_token``). ``hf_tokenizer_name`` is a Hub id (transformers reads it
  from the Hugging Face cache or downloads it) or a local tokenizer folder.

The export writes the vocabulary the runtime reads (CLIP's gzipped merges, or the ``tokenizer.json``
that transformers actually runs, with open_clip's padding and truncation in it) and checksums it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from compir.contracts import sha256_bytes, sha256_file
from compir.errors import InputError
from compir.train.hub import hub_access, load_failure

CLIP_BPE = "clip_bpe"
HF = "hf"
VOCAB_FILES = {CLIP_BPE: "vocab.bpe.txt.gz", HF: "tokenizer.json"}  # the file name in an export folder
# Options of open_clip's tokenizers that the torch-free runtime reproduces; anything else is refused.
_CLEAN_MODES = ("lower", "whitespace", "canonicalize")
_HF_OPTIONS = {"clean", "strip_sep_token"}
_CLIP_OPTIONS = {"clean"}


@dataclass(frozen=True)
class TextTokenizer:
    """Which open_clip tokenizer a model uses; calling it tokenizes exactly like open_clip.

    A small picklable value (data-loader workers get a copy); the open_clip tokenizer behind it is
    built once per process. ``options`` is ``text_cfg.tokenizer_kwargs`` as canonical JSON.
    """

    context_length: int
    hf_name: str = ""  # text_cfg.hf_tokenizer_name; "" = CLIP BPE
    options: str = "{}"

    @classmethod
    def of(cls, clip_cfg: dict[str, Any], *, context_length: int) -> TextTokenizer:
        """The tokenizer of an open_clip architecture (``ModelConfig.clip_cfg``)."""
        text_cfg = clip_cfg.get("text_cfg", {})
        mode = text_cfg.get("tokenizer_mode")
        if mode:
            raise InputError(f"open_clip tokenizer_mode {mode!r} is not supported by compir's runtime tokenizer")
        options = dict(text_cfg.get("tokenizer_kwargs", {}))
        name = str(text_cfg.get("hf_tokenizer_name", ""))
        allowed = _HF_OPTIONS if name else _CLIP_OPTIONS
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InputError(f"open_clip tokenizer_kwargs {unknown} are not supported by compir's runtime tokenizer")
        if str(options.get("clean", "lower")) not in _CLEAN_MODES:
            raise InputError(f"open_clip tokenizer clean mode {options['clean']!r} is not one of {list(_CLEAN_MODES)}")
        return cls(context_length=int(context_length), hf_name=name, options=json.dumps(options, sort_keys=True))

    @property
    def kind(self) -> str:
        return HF if self.hf_name else CLIP_BPE

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(B,) texts -> (B, context_length) int64 token ids, exactly open_clip's."""
        return _open_clip_tokenizer(self)(list(texts))

    def settings(self) -> dict[str, Any]:
        """What a torch-free runtime needs to reproduce :meth:`__call__` (the fields of TokenizerSpec
        but ``vocab_file``), as a checkpoint records it."""
        if self.kind == CLIP_BPE:
            from open_clip.tokenizer import _tokenizer

            return {
                "kind": CLIP_BPE,
                "context_length": self.context_length,
                "sot_id": int(_tokenizer.sot_token_id),
                "eot_id": int(_tokenizer.eot_token_id),
                "pad_id": 0,
                "clean": self._option("clean", "lower"),
                "vocab_sha256": _clip_vocab_sha256(),
            }
        hf = _open_clip_tokenizer(self).tokenizer
        return {
            "kind": HF,
            "context_length": self.context_length,
            "sot_id": _id_or_none(hf.bos_token_id if hf.bos_token_id is not None else hf.cls_token_id),
            "eot_id": _id_or_none(hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id),
            "pad_id": _id_or_none(hf.pad_token_id),
            "clean": self._option("clean", "whitespace"),  # HFTokenizer's default: no lower-casing
            "strip_sep_id": _id_or_none(hf.sep_token_id) if self._option("strip_sep_token", False) else -1,
            "vocab_sha256": sha256_bytes(_hf_vocab(self).encode("utf-8")),
        }

    def offsets(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """Hugging Face tokenizers: the cleaned text the ids of ``text`` are of, and each position's
        character span in it ((0, 0): special tokens, padding), from the same backend the export writes
        (so the runtime's ``HfTokenizer.offsets`` gives the same). CLIP's BPE has none: InputError."""
        if self.kind != HF:
            raise InputError("the CLIP BPE tokenizer gives no character offsets; compir.concepts counts its tokens per word")
        tokenizer = _open_clip_tokenizer(self)
        _hf_vocab(self)  # the first call configures the backend's padding and truncation
        cleaned = tokenizer.clean_fn(text)
        return cleaned, [(int(a), int(b)) for a, b in tokenizer.tokenizer.backend_tokenizer.encode(cleaned).offsets]

    def write_vocab(self, folder: Path) -> tuple[str, str]:
        """Write the vocabulary file the runtime reads into ``folder``: (file name, its sha256)."""
        name = VOCAB_FILES[self.kind]
        if self.kind == CLIP_BPE:
            shutil.copyfile(vocab_path(), folder / name)
        else:
            (folder / name).write_bytes(_hf_vocab(self).encode("utf-8"))
        return name, sha256_file(folder / name)

    def _option(self, key: str, default: Any) -> Any:
        return json.loads(self.options).get(key, default)


def tokenize(texts: Sequence[str], *, context_length: int) -> torch.Tensor:
    """CLIP BPE: (B,) texts -> (B, context_length) int64 ids: SOT, BPE tokens, EOT, zero padding.

    Texts longer than the context are truncated with EOT kept last (open_clip's rule). A model's
    own tokenizer is ``model.tokenizer`` (:class:`TextTokenizer`); this is the CLIP one.
    """
    return TextTokenizer(context_length=context_length)(texts)


def vocab_path() -> Path:
    """The gzipped BPE vocabulary open_clip's CLIP tokenizer uses (the export copies it)."""
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


@lru_cache(maxsize=1)
def _clip_vocab_sha256() -> str:
    return sha256_file(vocab_path())


def _id_or_none(value: int | None) -> int:
    return -1 if value is None else int(value)


@lru_cache(maxsize=8)
def _open_clip_tokenizer(spec: TextTokenizer) -> Any:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    options = json.loads(spec.options)
    if spec.kind == CLIP_BPE:
        return SimpleTokenizer(context_length=spec.context_length, **options)
    try:
        import transformers  # noqa: F401  (open_clip's HFTokenizer needs it)
    except ImportError as exc:
        raise InputError(f"tokenizer {spec.hf_name!r} is a Hugging Face tokenizer: pip install 'compir[hf]'") from exc
    online = False
    try:
        with hub_access(spec.hf_name) as online:
            tokenizer = HFTokenizer(spec.hf_name, context_length=spec.context_length, **options)
    except (OSError, ValueError) as exc:
        raise InputError(load_failure("Hugging Face tokenizer", spec.hf_name, setting="hf_tokenizer_name", loader="AutoTokenizer",
                                      online=online, error=exc)) from exc
    if not hasattr(tokenizer.tokenizer, "backend_tokenizer"):
        raise InputError(f"tokenizer {spec.hf_name!r} has no fast (tokenizer.json) form; the runtime needs one")
    return tokenizer


@lru_cache(maxsize=8)
def _hf_vocab(spec: TextTokenizer) -> str:
    """The backend tokenizer transformers runs for open_clip, serialised with the padding and
    truncation open_clip's call sets (so the runtime's ``encode_batch`` is the same call)."""
    tokenizer = _open_clip_tokenizer(spec)
    tokenizer(["x"])  # transformers configures padding / truncation on the backend at call time
    backend = tokenizer.tokenizer.backend_tokenizer
    if backend.encode_special_tokens:
        raise InputError(f"tokenizer {spec.hf_name!r} splits special tokens (split_special_tokens); the runtime does not")
    return str(backend.to_str())
