"""The checkpoint contract: self-describing, atomic, and loud about wrong / damaged / newer files."""

from __future__ import annotations

import pytest
import torch

from compir.contracts import CHECKPOINT_FORMAT, CHECKPOINT_SCHEMA
from compir.errors import ContractError
from compir.train.checkpoint import load_checkpoint, save_checkpoint
from compir.train.config import resolve_model_config
from compir.train.model import CIRModel
from compir.train.text import TextTokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(1)
    model = CIRModel(resolve_model_config("micro")).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model=model, metrics={"R@1": 12.5}, step=7, epoch=2, optimizer_state={"lr": 0.1})
    return model, path


def test_round_trip_rebuilds_an_identical_model(saved):
    model, path = saved
    loaded = load_checkpoint(path)
    assert not loaded.model.training
    assert (loaded.step, loaded.epoch, loaded.metrics, loaded.optimizer_state) == (7, 2, {"R@1": 12.5}, {"lr": 0.1})
    assert loaded.config == model.config and loaded.preprocess == model.preprocess
    assert loaded.tokenizer == TextTokenizer(context_length=16).settings()
    assert len(loaded.sha256) == 64
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(pixels)[0], model.encode_image(pixels)[0])
    assert not list(path.parent.glob(".*.tmp")), "atomic write left a temp file"


def test_ddp_style_wrapper_is_saved_unwrapped(saved, tmp_path):
    model, _ = saved

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    path = tmp_path / "wrapped.pt"
    save_checkpoint(path, model=Wrapper(model), metrics={}, step=0, epoch=0)
    record = torch.load(path, weights_only=True)
    assert not any(key.startswith("module.") for key in record["state_dict"])
    load_checkpoint(path)


def _rewrite(path, out, **changes):
    record = torch.load(path, weights_only=True)
    record.update(changes)
    torch.save(record, out)
    return out


def test_wrong_format_is_a_contract_error(saved, tmp_path):
    _, path = saved
    with pytest.raises(ContractError, match="format"):
        load_checkpoint(_rewrite(path, tmp_path / "other.pt", format="open_clip"))
    plain = tmp_path / "state_dict.pt"
    torch.save(torch.load(path, weights_only=True)["state_dict"], plain)
    with pytest.raises(ContractError, match="format"):
        load_checkpoint(plain)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ContractError, match="damaged or not a compir checkpoint"):
        load_checkpoint(text)


def test_truncated_file_is_a_contract_error(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        damaged = tmp_path / f"cut{cut}.pt"
        damaged.write_bytes(data[:cut])
        with pytest.raises(ContractError, match="damaged"):
            load_checkpoint(damaged)


def test_newer_schema_is_a_contract_error(saved, tmp_path):
    _, path = saved
    newer = _rewrite(path, tmp_path / "newer.pt", format=CHECKPOINT_FORMAT, schema_version=CHECKPOINT_SCHEMA + 1)
    with pytest.raises(ContractError, match="newer"):
        load_checkpoint(newer)


def test_weights_that_do_not_fit_the_config_are_a_contract_error(saved, tmp_path):
    _, path = saved
    record = torch.load(path, weights_only=True)
    state = dict(record["state_dict"])
    state.pop(next(iter(state)))
    with pytest.raises(ContractError, match="does not match"):
        load_checkpoint(_rewrite(path, tmp_path / "missing.pt", state_dict=state))


def test_missing_file_is_a_contract_error(tmp_path):
    with pytest.raises(ContractError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")
