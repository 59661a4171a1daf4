"""NEUCORE's concepts, mined from the modification text (torch-free: training and the runtime share it).

A small rule-based chunker: words are split on whitespace, stripped of punctuation; stop words
(function words, pronouns and edit verbs such as "make", "add", "change") are dropped; each run of
adjacent content words is one concept phrase (an adjective + noun pair such as "red cube" or
"long sleeves" stays together). The same text in every dataset, no hidden annotations.

:func:`concept_ids` maps the phrases to token positions: every token of a content word keeps its
id, every other position becomes padding (id 0), so the re-ranker graph, which attends from its
non-padding, non-special positions, attends from the concepts only. CLIP's BPE counts the tokens
of each word; a Hugging Face tokenizer (SigLIP, BERT, ...) gives each token's character span
instead (:func:`concept_ids_from_offsets`), the same spans in training and in the runtime.

:func:`pack_concepts` keeps a text's concept positions only, in text order, for the exported
graph: its progressive fusion steps once per position and a padding position is an exact no-op, so
the packed positions score as the full length does, at the cost of the concepts alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

PAD_ID = 0

STOP_WORDS = frozenset(
    """a an the this that these those it its it's is are was were be been being has have had do does did
    and or but nor so as of in on at to from by with without into onto over under than then there here
    i me my we our you your he him his she her they them their one ones some any more less most least very
    too also just only not no instead rather same other another each both all make makes made change changes
    changed replace replaced add adds added remove removes removed put turn turns take move moved let
    should would could can will shall may might must want wants like which what who whom whose where when
    how why while if up down out off please image picture photo shown show shows""".split()
)
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def words_of(text: str) -> list[str]:
    """The whitespace pieces of ``text``, lower-cased, each stripped to its word ('' where none)."""
    return [word for _, _, word in _pieces(text)]


def word_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, stop, word) of each whitespace piece's word in ``text`` (character offsets; pieces without one are left out)."""
    return [span for span in _pieces(text) if span[2]]


def _pieces(text: str) -> list[tuple[int, int, str]]:
    """Every whitespace piece of ``text`` as (start, stop, word) of its lower-cased word ('' and an empty span where none)."""
    spans = []
    for piece in re.finditer(r"\S+", text):
        match = _WORD.search(piece.group(0).lower())
        start = piece.start() + (match.start() if match else 0)
        spans.append((start, piece.start() + match.end(), match.group(0)) if match else (start, start, ""))
    return spans


def is_content(word: str) -> bool:
    return bool(word) and word not in STOP_WORDS


def mine_concepts(text: str) -> list[tuple[str, ...]]:
    """The concept phrases of ``text``: runs of adjacent content words, in text order."""
    phrases: list[tuple[str, ...]] = []
    run: list[str] = []
    for word in [*words_of(text), ""]:
        if is_content(word):
            run.append(word)
        elif run:
            phrases.append(tuple(run))
            run = []
    return phrases


def concept_ids(input_ids: np.ndarray, text: str, token_count: Callable[[str], int], *, first: int) -> np.ndarray:
    """``input_ids`` (L,) of ``text`` with every position outside a concept word set to padding.

    ``token_count(piece)``: how many tokens the tokenizer gives one whitespace piece alone;
    ``first``: the position of the first word token (1 after a start token). A text without any
    content word keeps all its ids (every word is then a concept)."""
    ids = np.asarray(input_ids)
    out = np.full_like(ids, PAD_ID)
    position = first
    spans = []
    for piece, word in zip(text.split(), words_of(text), strict=True):
        count = token_count(piece)
        spans.append((position, position + count, is_content(word)))
        position += count
    if position > len(ids):  # truncated by the context length: keep the words that fit
        spans = [(start, min(stop, len(ids)), keep) for start, stop, keep in spans if start < len(ids)]
    for start, stop, keep in spans:
        if keep:
            out[start:stop] = ids[start:stop]
    if not any(keep for _, _, keep in spans):
        return ids.copy()  # no content word (e.g. "make it so"): every word is a concept
    return out


def concept_ids_from_offsets(input_ids: np.ndarray, text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """:func:`concept_ids` for a tokenizer that gives each position's character span in ``text``
    (``offsets``, (0, 0) for special tokens and padding): a token overlapping a content word keeps its id."""
    ids = np.asarray(input_ids)
    content = [(start, stop) for start, stop, word in word_spans(text) if is_content(word)]
    if not content:
        return ids.copy()  # no content word: every word is a concept
    keep = [stop > start and any(start < end and stop > begin for begin, end in content) for start, stop in offsets]
    return np.where(np.array(keep[: len(ids)] + [False] * (len(ids) - len(keep))), ids, PAD_ID)


def pack_concepts(
    token_features: np.ndarray, input_ids: np.ndarray, *, slots: int | None = None, id_slots: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One text's (Lt, Wt) token states and (Li,) concept ids (:func:`concept_ids`) -> (S, Wt)
    states and (S',) ids holding its non-padding positions first, in text order, then padding.

    ``slots``: S, a graph's fixed position count (ValueError when the text has more), or None: as
    many as the text has (at least 1). ``Li`` may exceed ``Lt`` by the positions a pooler drops (a
    CLS tower's states start at id 1): state ``p`` pairs with id ``p + Li - Lt``, and in the output
    with id ``p + S' - S`` (``id_slots``: S', default S)."""
    ids = np.asarray(input_ids)
    offset = len(ids) - len(token_features)
    kept = np.flatnonzero(ids[offset:] != PAD_ID)
    slots = max(len(kept), 1) if slots is None else slots
    if len(kept) > slots:
        raise ValueError(f"the text has {len(kept)} concept positions, the graph takes {slots}")
    id_slots = slots if id_slots is None else id_slots
    states = np.zeros((slots, *token_features.shape[1:]), dtype=token_features.dtype)
    states[: len(kept)] = token_features[kept]
    packed = np.full((id_slots,), PAD_ID, dtype=ids.dtype)
    packed[id_slots - slots : id_slots - slots + len(kept)] = ids[offset + kept]
    return states, packed
