"""Local stand-ins for the Hugging Face files open_clip's non-CLIP text families load (nothing
can be downloaded): small tokenizers trained here with the ``tokenizers`` library, in the layout
and tokenizer class of the real ones, and tiny random HF text-tower configs. ``compir bench
coverage`` builds them where the Hub cannot be reached, and the tests use them; they ship with
the package (benchmarks/), so the benchmark runs from an installed compir too.

Each tokenizer family mirrors a real one open_clip names in ``hf_tokenizer_name``:

- ``bert``: WordPiece, lower-casing, ``[CLS] $A [SEP]``, pad 0 (bert-base-uncased: CLIPA, BERT towers);
- ``roberta``: byte-level BPE, ``<s> $A </s>``, pad 1 (roberta-base);
- ``xlm-roberta``: sentencepiece Unigram, ``<s> $A </s>``, pad 1 (xlm-roberta-base/large, xlm-v);
- ``mt5``: sentencepiece Unigram, ``$A </s>``, pad 0 (google/mt5-*, the worldwide ViTs);
- ``siglip``: as ``mt5`` but padded with ``</s>`` (id 1) like timm/ViT-B-16-SigLIP's T5 vocabulary;
- ``siglip2``: Gemma's byte-fallback BPE, no BOS, ``$A <eos>``, pad 0 (the SigLIP2 towers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_FAMILIES = ("bert", "roberta", "xlm-roberta", "mt5", "siglip", "siglip2")
TOWER_FAMILIES = ("bert", "roberta", "xlm-roberta", "mt5", "nllb")

# Hugging Face Hub id (a substring of it, first match wins) -> the stand-in family of the same tokenizer
# class / model type. NLLB's real tokenizer is a sentencepiece one as well: xlm-roberta's layout stands in.
_HUB_TOKENIZERS = (("siglip2", "siglip2"), ("siglip", "siglip"), ("xlm-roberta", "xlm-roberta"), ("xlm-v", "xlm-roberta"),
                   ("nllb", "xlm-roberta"), ("roberta", "roberta"), ("mt5", "mt5"), ("bert", "bert"))
_HUB_TOWERS = (("xlm-roberta", "xlm-roberta"), ("roberta", "roberta"), ("nllb", "nllb"), ("mt5", "mt5"), ("bert", "bert"))


def standin_family(hub_id: str, *, tower: bool = False) -> str:
    """The stand-in family for a Hub tokenizer id (``tower``: a Hub text-model id), e.g.
    ``bert-base-uncased`` -> ``bert``, ``timm/ViT-B-16-SigLIP2`` -> ``siglip2``; ValueError if none fits."""
    for part, family in _HUB_TOWERS if tower else _HUB_TOKENIZERS:
        if part in hub_id.lower():
            return family
    raise ValueError(f"no local stand-in for Hugging Face {'text tower' if tower else 'tokenizer'} {hub_id!r}")

_SENTENCES = [
    "make it red and larger", "remove the blue triangle", "add a green circle to the left of the square",
    "Change the SHIRT to a sleeveless t-shirt!", "don't you'll we're it's I'd they've I'm",
    "café naïve Zoë straße", "東京 の 赤い 車", "красный синий зелёный", "أحمر أزرق", "빨간 파란", "ไทย Ελληνικά हिन्दी",
    "x² ½ Ⅻ 12345 3.14 1,000 0x1F", "🐶 👍🏽 🇫🇷 ❤️ ✨", "the cube is behind the sphere; swap their colours",
]


def build_tokenizer(folder: Path, family: str) -> Path:
    """Train a small tokenizer of ``family`` and save it as a Hugging Face tokenizer folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    corpus = [s for s in _SENTENCES for _ in range(20)]
    special: dict[str, Any]
    if family == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=400, special_tokens=names))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        tok.decoder = decoders.WordPiece()
        special = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
                   "do_lower_case": True, "tokenizer_class": "BertTokenizer"}
    elif family == "roberta":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        tok.decoder = decoders.ByteLevel()
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "<s>",
                   "sep_token": "</s>", "mask_token": "<mask>", "tokenizer_class": "RobertaTokenizer"}
    elif family == "siglip2":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        bytes_ = [f"<0x{b:02X}>" for b in range(256)]
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", *bytes_]))
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "add_bos_token": False, "add_eos_token": True, "padding_side": "right", "tokenizer_class": "GemmaTokenizer"}
    else:  # sentencepiece Unigram: xlm-roberta, mt5, siglip
        xlmr = family == "xlm-roberta"
        names = ["<s>", "<pad>", "</s>", "<unk>"] if xlmr else ["<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=names, unk_token="<unk>"))
        if xlmr:
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
            )
        else:
            tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
        tok.decoder = decoders.Metaspace()
        special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>" if family == "siglip" else "<pad>",
                   "tokenizer_class": "T5Tokenizer"}
        if xlmr:
            special.update(bos_token="<s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>", tokenizer_class="XLMRobertaTokenizer")
    if family not in TOKENIZER_FAMILIES:
        raise ValueError(family)
    from transformers import PreTrainedTokenizerFast

    tokens = {k: v for k, v in special.items() if k.endswith("_token")}
    PreTrainedTokenizerFast(tokenizer_object=tok, **tokens).save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(special)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return folder


def build_text_tower(folder: Path, family: str) -> Path:
    """A tiny random Hugging Face text model config (``config.json`` only: open_clip builds it with
    ``AutoModel.from_config``), for ``text_cfg.hf_model_name``."""
    from transformers import BertConfig, M2M100Config, MT5Config, RobertaConfig, XLMRobertaConfig

    common: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                              "max_position_embeddings": 80}
    if family == "bert":
        config: Any = BertConfig(vocab_size=400, pad_token_id=0, **common)
    elif family == "xlm-roberta":
        config = XLMRobertaConfig(vocab_size=300, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    elif family == "roberta":
        config = RobertaConfig(vocab_size=400, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    elif family == "mt5":  # an encoder-decoder: open_clip keeps its encoder
        config = MT5Config(vocab_size=300, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                           pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    elif family == "nllb":  # M2M100 (nllb-clip): an encoder-decoder with sinusoidal positions
        config = M2M100Config(vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=80,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2)
    else:
        raise ValueError(family)
    config.save_pretrained(str(folder))
    return folder
