"""The torch-free tokenizers against open_clip's, on a generated corpus and with hypothesis: CLIP BPE,
and every Hugging Face tokenizer family open_clip configs name (SigLIP, SigLIP2, CLIPA, the HF text
towers), each through open_clip's own ``get_tokenizer`` on a local stand-in (tests/fixtures/text_towers.py)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compir.errors import ContractError, InputError
from compir.manifest import TokenizerSpec
from compir.runtime.tokenizer import MAX_TEXT_CHARS, ClipTokenizer, HfTokenizer, load_tokenizer
from tests.fixtures.text_towers import build_tokenizer

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer", reason="parity needs open_clip")

CONTEXT = 32
_WORDS = ["make", "it", "red", "the", "circle", "Square", "LARGER", "remove", "add", "a", "blue", "triangle",
          "shirt", "sleeveless", "t-shirt", "don't", "you'll", "we're", "it's", "I'd", "they've", "I'm", "café",
          "naïve", "Zoë", "straße", "東京", "красный", "أحمر", "빨간", "ไทย", "Ελληνικά", "हिन्दी", "x²", "½", "Ⅻ"]
_PUNCT = ["!", "?", "...", ",", ";", ":", "--", "(", ")", "[", "]", "{}", "\"", "'", "`", "@", "#", "$", "%",
          "^", "&", "*", "_", "+", "=", "|", "\\", "/", "<", ">", "~", "’", "“", "”", "…", "—", "·"]
_EMOJI = ["🐶", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤷‍♀️", "🙂", "🧪", "✨"]
_ODD = ["&amp;", "&lt;b&gt;", "&#39;", "&amp;amp;", "Ã©tÃ©", "â€™", "\u00a0", "\t", "\n", "\r\n", "\u200b",
        "\u3000", "<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "12345", "3.14", "1,000", "0x1F"]


def _corpus(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [_WORDS, _PUNCT, _EMOJI, _ODD]
    corpus = ["", " ", "   \t\n ", "a", "A", "'", "''", "'s", "🐶" * 40, "word " * 60, "x" * 300, "é" * 100]
    while len(corpus) < count:
        length = rng.choice([1, 2, 3, 5, 8, 13, 30, 80])
        parts = [rng.choice(rng.choices(pools, weights=[6, 2, 1, 1])[0]) for _ in range(length)]
        joiner = rng.choice([" ", "", "  ", " \t"])
        text = joiner.join(parts)
        if rng.random() < 0.2:
            text = text.upper()
        if rng.random() < 0.1:
            text = "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 40)))
        corpus.append(text)
    return corpus


def _pair(clean: str = "lower") -> tuple[ClipTokenizer, object]:
    bpe = open_clip_tokenizer.default_bpe()
    reference = open_clip_tokenizer.SimpleTokenizer(bpe_path=bpe, context_length=CONTEXT, clean=clean)
    spec = TokenizerSpec(kind="clip_bpe", vocab_file="vocab.bpe.txt.gz", vocab_sha256="", context_length=CONTEXT,
                         sot_id=reference.sot_token_id, eot_id=reference.eot_token_id, pad_id=0, clean=clean)
    return ClipTokenizer(bpe, spec), reference


TOKENIZER, REFERENCE = _pair()


def test_corpus_matches_open_clip() -> None:
    corpus = _corpus(1500, seed=0)
    assert len(corpus) >= 1000 and any(len(t) > 200 for t in corpus) and "" in corpus
    ours = TOKENIZER(corpus)
    theirs = REFERENCE(corpus).numpy()  # type: ignore[attr-defined]
    mismatched = [corpus[i] for i in np.nonzero((ours != theirs).any(axis=1))[0]]
    assert not mismatched, mismatched[:5]
    assert (ours[:, -1] != 0).sum() > 10  # the corpus really exercises truncation


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_other_clean_modes_match_open_clip(clean: str) -> None:
    ours, theirs = _pair(clean)
    corpus = _corpus(300, seed=1)
    np.testing.assert_array_equal(ours(corpus), theirs(corpus).numpy())  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_any_text_matches_open_clip(text: str) -> None:
    np.testing.assert_array_equal(TOKENIZER([text]), REFERENCE([text]).numpy())  # type: ignore[operator]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=4))
def test_rows_are_framed_and_padded(texts: list[str]) -> None:
    spec = TOKENIZER.spec
    ids = TOKENIZER(texts)
    assert ids.shape == (len(texts), CONTEXT) and ids.dtype == np.int64
    for row in ids:
        assert row[0] == spec.sot_id
        end = int(np.nonzero(row == spec.eot_id)[0][-1])
        assert (row[end + 1 :] == spec.pad_id).all()


def test_overlong_text_is_truncated_with_end_marker() -> None:
    ids = TOKENIZER(["red " * 100])[0]
    assert ids[-1] == TOKENIZER.spec.eot_id and (ids[1:-1] == ids[1]).all()


def test_text_over_the_character_limit_is_refused() -> None:
    with pytest.raises(InputError, match="limit"):
        TOKENIZER(["a" * (MAX_TEXT_CHARS + 1)])


def test_blank_texts() -> None:
    assert TOKENIZER.is_blank("") and TOKENIZER.is_blank(" \t\n\u3000") and not TOKENIZER.is_blank(" a ")


def test_mismatched_special_ids_are_refused() -> None:
    bpe = open_clip_tokenizer.default_bpe()
    spec = TokenizerSpec(kind="clip_bpe", vocab_file="v", vocab_sha256="", context_length=8, sot_id=1, eot_id=2, pad_id=0)
    with pytest.raises(ContractError, match="start/end ids"):
        ClipTokenizer(bpe, spec)


def test_damaged_vocab_is_refused(tmp_path) -> None:
    broken = tmp_path / "vocab.bpe.txt.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(ContractError, match="damaged"):
        ClipTokenizer(broken, TOKENIZER.spec)


# (tokenizer family, open_clip text_cfg entries) as open_clip's own configs of that family write them.
HF_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "siglip": ("siglip", {"tokenizer_kwargs": {"clean": "canonicalize"}, "context_length": 64}),  # ViT-*-SigLIP (T5 vocab)
    "siglip-16": ("siglip", {"tokenizer_kwargs": {"clean": "canonicalize"}, "context_length": 16}),  # ViT-SO400M-14-SigLIP
    "siglip2": ("siglip2", {"tokenizer_kwargs": {"clean": "canonicalize"}, "context_length": 64}),  # ViT-*-SigLIP2 (Gemma)
    "clipa": ("bert", {"tokenizer_kwargs": {"strip_sep_token": True}, "context_length": 32}),  # ViT-*-CLIPA (bert-base-uncased)
    "mt5-worldwide": ("mt5", {"tokenizer_kwargs": {"clean": "canonicalize"}, "context_length": 77}),  # ViT-L-14-worldwide
    "mt5": ("mt5", {}),  # mt5-base-ViT-B-32 (default clean "whitespace", 77 tokens)
    "xlm-roberta": ("xlm-roberta", {}),  # xlm-roberta-*-ViT-*, ViT-*-worldwide (xlm-v)
    "roberta": ("roberta", {}),  # roberta-ViT-B-32
    "bert": ("bert", {}),  # a BERT tower (cls pooler)
}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers", reason="HF tokenizers need transformers")
    root = tmp_path_factory.mktemp("hf-tokenizers")
    return {family: build_tokenizer(root / family, family) for family in {family for family, _ in HF_CASES.values()}}


def _hf_pair(case: str, folders: dict[str, Path], out: Path) -> tuple[HfTokenizer, object]:
    """(the runtime tokenizer read from an export-style folder, open_clip.get_tokenizer of the same config)."""
    import open_clip

    from compir.train.model import _register_architecture
    from compir.train.text import TextTokenizer

    family, entries = HF_CASES[case]
    arch = {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_tokenizer_name": str(folders[family]), **entries}}
    reference = open_clip.get_tokenizer(_register_architecture(arch))
    ours = TextTokenizer.of(arch, context_length=entries.get("context_length", 77))
    settings = ours.settings()
    out.mkdir(parents=True, exist_ok=True)
    vocab_file, vocab_sha = ours.write_vocab(out)
    assert vocab_sha == settings["vocab_sha256"]
    tokenizer = load_tokenizer(out, TokenizerSpec(vocab_file=vocab_file, **settings))
    assert isinstance(tokenizer, HfTokenizer)
    return tokenizer, reference


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_corpus_matches_open_clip(case: str, hf_folders: dict[str, Path], tmp_path: Path) -> None:
    tokenizer, reference = _hf_pair(case, hf_folders, tmp_path)
    corpus = _corpus(1000, seed=2)
    ours = tokenizer(corpus)
    theirs = reference(corpus).numpy()  # type: ignore[operator]
    mismatched = [corpus[i] for i in np.nonzero((ours != theirs).any(axis=1))[0]]
    assert not mismatched, mismatched[:5]
    assert ours.shape == (1000, tokenizer.context_length)
    overlong = sum(len(tokenizer.encode(text)) > tokenizer.context_length for text in corpus)
    assert overlong > 10  # the corpus really exercises truncation


@pytest.fixture(scope="module")
def siglip2_pair(hf_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[HfTokenizer, object]:
    return _hf_pair("siglip2", hf_folders, tmp_path_factory.mktemp("siglip2-export"))


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=120))
def test_any_text_matches_open_clip_siglip2(siglip2_pair: tuple[HfTokenizer, object], text: str) -> None:
    tokenizer, reference = siglip2_pair
    np.testing.assert_array_equal(tokenizer([text]), reference([text]).numpy())  # type: ignore[operator]


def test_hf_blank_texts_and_strip_sep(hf_folders: dict[str, Path], tmp_path: Path) -> None:
    tokenizer, _ = _hf_pair("clipa", hf_folders, tmp_path)
    assert tokenizer.is_blank("") and tokenizer.is_blank(" \t\n\u3000") and tokenizer.is_blank("&nbsp;")
    assert not tokenizer.is_blank(" a ")
    assert tokenizer.spec.strip_sep_id == 3 and not (tokenizer(["make it red"]) == 3).any()  # [SEP] -> 0, as open_clip


def test_hf_tokenizer_file_from_another_export_is_refused(hf_folders: dict[str, Path], tmp_path: Path) -> None:
    tokenizer, _ = _hf_pair("siglip2", hf_folders, tmp_path / "a")
    with pytest.raises(ContractError, match="pads/truncates to 64/64 tokens, the manifest says 32"):
        HfTokenizer(tmp_path / "a" / "tokenizer.json", replace(tokenizer.spec, context_length=32))
    (tmp_path / "a" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ContractError, match="damaged"):
        HfTokenizer(tmp_path / "a" / "tokenizer.json", tokenizer.spec)
    with pytest.raises(ContractError, match="checksum|sha256"):
        load_tokenizer(tmp_path / "a", tokenizer.spec)
