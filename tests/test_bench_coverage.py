"""``compir bench coverage``'s offline stand-ins: every Hub tokenizer / text tower open_clip names gets a
local stand-in of its class with the name's own settings kept, and a Hub-tokenizer name runs on it
through train -> export -> index -> search with the runtime's ids equal to open_clip's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.bench_coverage import (
    _open_clip_tokenizer_name,
    build_standins,
    check_name,
    hub_ids,
    shrink,
    standin_label,
    substitute_standins,
)

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers", reason="stand-in tokenizers need transformers")


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_standins(tmp_path_factory.mktemp("standins"))


def test_every_hub_name_gets_a_standin_and_keeps_its_settings(standins: dict[str, Path]) -> None:
    hub_names = [name for name in open_clip.list_models()
                 if hub_ids(open_clip.get_model_config(name)) and "multimodal_cfg" not in open_clip.get_model_config(name)]
    assert len(hub_names) >= 40  # open_clip 3.3.0: 48 (SigLIP, SigLIP2, CLIPA, worldwide, HF text towers)
    for name in hub_names:
        arch = shrink(open_clip.get_model_config(name))
        before = dict(arch["text_cfg"])
        assert standin_label(arch).startswith("stand-in ")
        substitute_standins(arch, standins)
        after = arch["text_cfg"]
        assert not hub_ids(arch), name
        changed = {key for key in before if before[key] != after[key]}
        assert changed <= {"hf_tokenizer_name", "hf_model_name", "vocab_size"}, (name, changed)
    assert standin_label(open_clip.get_model_config("ViT-B-32")) == ""
    assert standin_label(open_clip.get_model_config("ViT-B-16-SigLIP2")) == "stand-in siglip2 tokenizer"
    assert standin_label(open_clip.get_model_config("nllb-clip-base")) == "stand-in xlm-roberta tokenizer + nllb tower"


def test_open_clip_reads_the_names_tokenizer_options_with_the_standin(standins: dict[str, Path], tmp_path: Path) -> None:
    arch = shrink(open_clip.get_model_config("ViT-L-14-CLIPA"))  # bert-base-uncased, 32 tokens, strip_sep_token
    substitute_standins(arch, standins)
    tokens = open_clip.get_tokenizer(_open_clip_tokenizer_name("ViT-L-14-CLIPA", arch, tmp_path))(["make it red"]).numpy()
    sep = 3  # the stand-in BertTokenizer's [SEP]
    assert tokens.shape == (1, 32) and tokens[0, 0] == 2 and sep not in tokens
    assert _open_clip_tokenizer_name("ViT-B-32", shrink(open_clip.get_model_config("ViT-B-32")), tmp_path) == "ViT-B-32"


def test_a_hub_tokenizer_name_passes_on_its_standin(standins: dict[str, Path], synth_data: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((synth_data / "images").glob("*.png"))[:6]:
        shutil.copy(path, images / path.name)
    result = check_name("ViT-L-14-CLIPA", work=tmp_path / "work", data=synth_data, images=images, standins=standins)
    assert result == ("pass", "")


def test_run_alone_a_shard_writes_its_own_record_beside_the_others(tmp_path: Path) -> None:
    """``python -m benchmarks.bench_coverage`` writes the runner's record (format, machine, table),
    named by shard, so a shard and a whole run in one folder keep both and report.md reads them."""
    import json

    from benchmarks.bench_coverage import main
    from benchmarks.runner import BENCH_FORMAT

    (tmp_path / "coverage.json").write_text(json.dumps({"format": BENCH_FORMAT, "name": "coverage"}), encoding="utf-8")
    assert main(["--quick", "--hub-only", "--offline-standins", "on", "--shard", "9/9", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "coverage-9of9.json").read_text(encoding="utf-8"))
    assert record["format"] == BENCH_FORMAT and record["name"] == "coverage-9of9" and record["figures"]["shard"] == "9/9"
    assert record["machine"] and "|" in record["table"]
    assert json.loads((tmp_path / "coverage.json").read_text(encoding="utf-8"))["name"] == "coverage"  # left alone
