"""Torch-free tokenizers: exactly open_clip's token ids, from the export's vocab file.

Two kinds, as the manifest's :class:`compir.manifest.TokenizerSpec` says (:func:`load_tokenizer`):
:class:`ClipTokenizer` (CLIP's BPE, pure Python: ``regex`` + ``ftfy``) and :class:`HfTokenizer`
(a ``tokenizer.json`` run by the ``tokenizers`` library: SigLIP, SigLIP2, CLIPA and the Hugging
Face text towers; open_clip's ``HFTokenizer`` cleaning and ``strip_sep_token`` around it).

Text handling (what the Retriever relies on):
- text is cleaned like open_clip (ftfy, html unescape twice, whitespace collapsed, lowercased for
  ``clean="lower"``); :meth:`ClipTokenizer.is_blank` tells whether that leaves no token to encode
  (empty, whitespace, control characters, a byte-order mark, ``&nbsp;``);
- text longer than the context is truncated like open_clip: CLIP keeps the first ``context_length``
  ids and replaces the last one by the end-of-text id; ``hf`` truncates as its tokenizer.json says;
- text above :data:`MAX_TEXT_CHARS` characters is refused with InputError before any BPE work,
  so a megabyte of text cannot stall a server worker.
"""

from __future__ import annotations

import gzip
import html
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import ftfy
import numpy as np
import regex

from compir.contracts import verify_sha256
from compir.errors import ContractError, InputError
from compir.manifest import TokenizerSpec

MAX_TEXT_CHARS = 4096  # ~ 50x CLIP's context; anything longer is refused, not truncated
_MERGES = 49152 - 256 - 2  # merges CLIP's vocab uses (the file holds a few more)
_SPECIAL = ("<start_of_text>", "<end_of_text>")
_PATTERN = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """Each UTF-8 byte -> a printable character (BPE never sees whitespace/control bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table  # insertion order = CLIP's vocab order: printable bytes first


class Tokenizer(Protocol):
    """What the runtime asks of a tokenizer (both kinds)."""

    spec: TokenizerSpec
    context_length: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode(self, text: str) -> list[int]: ...

    def is_blank(self, text: str) -> bool: ...


def load_tokenizer(export_dir: str | Path, spec: TokenizerSpec) -> Tokenizer:
    """The tokenizer of an export folder, by the manifest's kind; its vocab checksum is verified first."""
    kinds: dict[str, type[ClipTokenizer] | type[HfTokenizer]] = {"clip_bpe": ClipTokenizer, "hf": HfTokenizer}
    if spec.kind not in kinds:
        raise ContractError(f"manifest tokenizer: kind {spec.kind!r} is not supported ({' or '.join(map(repr, kinds))})")
    path = Path(export_dir) / spec.vocab_file
    verify_sha256(path, spec.vocab_sha256, what="tokenizer vocab")
    return kinds[spec.kind](path, spec)


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


@lru_cache(maxsize=4096)
def clean_text(text: str, *, mode: str = "lower") -> str:
    """open_clip's cleaning: ``lower`` (default), ``whitespace`` or ``canonicalize``.

    Cached: a served query's text is cleaned by the check on the event loop (``is_blank``) and again
    when it is encoded, and ftfy's pass is the costly part of both."""
    cleaned = _basic_clean(text)
    if mode == "canonicalize":
        cleaned = cleaned.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(cleaned.split()).lower() if mode == "lower" else " ".join(cleaned.split())


class ClipTokenizer:
    """CLIP's byte-level BPE. ``tokenizer(texts)`` -> ``input_ids`` (B, L) int64."""

    def __init__(self, vocab_file: str | Path, spec: TokenizerSpec) -> None:
        if spec.kind != "clip_bpe":
            raise ContractError(f"manifest tokenizer: kind {spec.kind!r} is not supported (only 'clip_bpe')")
        if spec.clean not in ("lower", "whitespace", "canonicalize"):
            raise ContractError(f"manifest tokenizer: clean mode {spec.clean!r} is not supported")
        self.spec = spec
        self.context_length = spec.context_length
        alphabet = list(_byte_alphabet().values())
        merges = [tuple(line.split()) for line in _read_merges(Path(vocab_file))]
        vocab = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(pair) for pair in merges] + list(_SPECIAL)
        self._encoder = {symbol: index for index, symbol in enumerate(vocab)}
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._bytes = _byte_alphabet()
        self._cache: dict[str, list[int]] = {}
        found = (self._encoder[_SPECIAL[0]], self._encoder[_SPECIAL[1]])
        if found != (spec.sot_id, spec.eot_id):
            raise ContractError(
                f"vocab {vocab_file} gives start/end ids {found}, the manifest says {(spec.sot_id, spec.eot_id)}; "
                "the export folder mixes files from different exports"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end markers, no truncation."""
        _check_length(text)
        ids: list[int] = []
        for piece in _PATTERN.findall(clean_text(text, mode=self.spec.clean)):
            ids.extend(self._bpe("".join(self._bytes[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (B, context_length) int64, padded with ``pad_id``, truncated like open_clip."""
        _check_batch(texts)
        length = self.context_length
        batch = np.full((len(texts), length), self.spec.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.spec.sot_id, *self.encode(text), self.spec.eot_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.spec.eot_id
            batch[row, : len(ids)] = ids
        return batch

    def is_blank(self, text: str) -> bool:
        """True when :meth:`encode` gives no token ids: cleaning leaves no piece for BPE (each piece
        is at least one id), so the query would be the start and end markers alone."""
        return not _PATTERN.findall(clean_text(text[:MAX_TEXT_CHARS], mode=self.spec.clean))

    def _bpe(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        if piece in _SPECIAL:  # a literal "<end_of_text>" in the text maps to the special id, as in open_clip
            return [self._encoder[piece]]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            # Merge the lowest-ranked adjacent pair everywhere it occurs, left to right.
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: self._ranks.get(pair, _MERGES + 1))
            if best not in self._ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self._encoder[symbol] for symbol in word]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids


def _read_merges(path: Path) -> list[str]:
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise ContractError(f"tokenizer vocab {path} is damaged ({exc}); re-export the model") from exc
    merges = lines[1 : _MERGES + 1]
    if len(merges) != _MERGES:
        raise ContractError(f"tokenizer vocab {path} has {len(merges)} merges, expected {_MERGES}")
    return merges


class HfTokenizer:
    """A Hugging Face ``tokenizer.json`` as open_clip's ``HFTokenizer`` runs it: open_clip's cleaning,
    then the backend's own normalizer, pre-tokenizer, model, special tokens, padding and truncation
    (recorded in the file by the export), then ``strip_sep_id`` -> 0. ``tokenizer(texts)`` -> (B, L) int64.
    """

    def __init__(self, tokenizer_file: str | Path, spec: TokenizerSpec) -> None:
        if spec.kind != "hf":
            raise ContractError(f"manifest tokenizer: kind {spec.kind!r} is not 'hf'")
        if spec.clean not in ("lower", "whitespace", "canonicalize"):
            raise ContractError(f"manifest tokenizer: clean mode {spec.clean!r} is not supported")
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError as exc:  # a core dependency; only a broken install lacks it
            raise ContractError("this export uses a Hugging Face tokenizer: pip install tokenizers") from exc
        self.spec = spec
        self.context_length = spec.context_length
        try:
            self._backend: Any = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises its own Exception subclass
            raise ContractError(f"tokenizer file {tokenizer_file} is damaged ({str(exc)[:200]}); re-export the model") from exc
        truncation, padding = self._backend.truncation or {}, self._backend.padding or {}
        if truncation.get("max_length") != self.context_length or padding.get("length") != self.context_length:
            raise ContractError(
                f"tokenizer file {tokenizer_file} pads/truncates to {padding.get('length')}/{truncation.get('max_length')} "
                f"tokens, the manifest says {self.context_length}; the export folder mixes files from different exports"
            )
        # A plain copy without padding/truncation/special tokens gives what the text alone becomes.
        self._plain: Any = Backend.from_str(self._backend.to_str())
        self._plain.no_padding()
        self._plain.no_truncation()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens, no truncation."""
        _check_length(text)
        return list(self._plain.encode(clean_text(text, mode=self.spec.clean), add_special_tokens=False).ids)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (B, context_length) int64, padded and truncated like open_clip's HFTokenizer."""
        _check_batch(texts)
        for text in texts:
            _check_length(text)
        # One call per text: encode_batch would start the library's thread pool, which a forking server then warns about.
        encodings = [self._backend.encode(clean_text(text, mode=self.spec.clean)) for text in texts]
        batch = np.array([encoding.ids for encoding in encodings], dtype=np.int64).reshape(len(texts), self.context_length)
        if self.spec.strip_sep_id >= 0:
            batch[batch == self.spec.strip_sep_id] = 0
        return batch

    def offsets(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """The cleaned text :meth:`__call__` tokenizes for ``text`` and each position's character span
        in it ((0, 0): special tokens, padding); NEUCORE maps its concept words to positions by them."""
        _check_length(text)
        cleaned = clean_text(text, mode=self.spec.clean)
        return cleaned, [(int(a), int(b)) for a, b in self._backend.encode(cleaned).offsets]

    def is_blank(self, text: str) -> bool:
        """True when the text alone gives no token id (the query would be special tokens only)."""
        return not self.encode(text[:MAX_TEXT_CHARS])


def _check_length(text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"text is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}")


def _check_batch(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise TypeError("pass a sequence of texts, not a single string")
