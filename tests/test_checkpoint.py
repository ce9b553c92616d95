"""Checkpoints: a save interrupted half-way is never mistaken for a checkpoint; old ones are pruned."""

import os

import pytest
import torch
from accelerate import Accelerator

from rufus.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


@pytest.fixture
def acc():
    return Accelerator(cpu=True)


def make():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path, acc):
    model, opt = make()
    save_checkpoint(tmp_path, 5, accelerator=acc, models={"m": model}, optimizers={"m": opt})
    expected_draw = torch.rand(3)
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    info = load_checkpoint(
        latest_checkpoint(tmp_path), accelerator=acc, models={"m": fresh}, optimizers={"m": fresh_opt}
    )
    assert info["step"] == 5
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was at save time


def test_interrupted_save_is_ignored_and_pruning_keeps_newest(tmp_path, acc):
    model, opt = make()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, accelerator=acc, models={"m": model}, optimizers={"m": opt}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    # a save killed half-way leaves only its temporary directory behind
    half = tmp_path / "checkpoints" / ".tmp-step-0000004"
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    with pytest.raises(FileNotFoundError):
        load_checkpoint(half, accelerator=acc, models={"m": model}, optimizers={"m": opt})
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "checkpoints"))
