"""Checkpoints: weights_only round trip, RNG state, atomicity, clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from hermes.config import OptimConfig
from hermes.errors import HermesError
from hermes.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from hermes.training.optim import Lamb, build_scheduler


def _state() -> dict:
    model = nn.Linear(3, 2)
    opt = Lamb(model.parameters(), lr=0.01)
    sched = build_scheduler(opt, OptimConfig(warmup_steps=2), total_steps=10)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    return {
        "step": 1,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "config": {"steps": 10, "data": {"patch_size": [32, 32, 32]}, "output": "/tmp/x"},
    }


def test_round_trip_loads_with_weights_only(tmp_path) -> None:
    state = _state()
    path = save_checkpoint(tmp_path / "c" / "last.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and loaded["config"] == state["config"]
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    # the file itself really is weights-only compatible
    torch.load(path, weights_only=True)
    assert not list(path.parent.glob(".*.tmp"))


def test_rng_state_restores_every_generator() -> None:
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_rng_states_after_a_checkpoint_round_trip_equal_the_captured_ones(tmp_path) -> None:
    """Through the real path (capture -> save -> load -> restore), each global state itself is
    back, not only its next draw."""
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    py, nps, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    path = save_checkpoint(tmp_path / "last.pt", {"rng": capture_rng_state()})
    random.seed(4), np.random.seed(4), torch.manual_seed(4)
    random.gauss(0, 1), np.random.standard_normal(), torch.randn(3)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert random.getstate() == py
    after = np.random.get_state()
    assert after[0] == nps[0] and np.array_equal(after[1], nps[1]) and after[2:] == nps[2:]
    assert torch.equal(torch.get_rng_state(), th)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # killed while serialising

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(HermesError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(HermesError, match="cannot be loaded"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(HermesError, match="not a Hermes training checkpoint"):
        load_checkpoint(foreign)
