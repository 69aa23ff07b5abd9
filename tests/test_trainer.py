"""The training loop on the small synthetic cohort: outputs, config checks, exact resume, MedContext."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hermes.config import TrainConfig, load_train_config
from hermes.errors import ConfigError, HermesError
from hermes.training.checkpoint import checkpoint_path, load_checkpoint
from hermes.training.trainer import train


def _config(small_cache: tuple[Path, Path], output: Path, **overrides: Any) -> TrainConfig:
    catalog, cache = small_cache
    data: dict[str, Any] = {
        "catalog": str(catalog),
        "cache": str(cache),
        "output": str(output),
        "steps": 4,
        "log_every": 1,
        "checkpoint_every": 2,
        "deterministic": True,
        "precision": "fp32",
        "model": {"preset": "tiny"},
        "data": {"patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0},
        "optim": {"warmup_steps": 1},
        "validation": {"every_steps": 2, "mode": "patch", "max_cases_per_dataset": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return TrainConfig.model_validate(data)


NO_VALIDATION = {"val_fraction": 0.0, "patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0}


def _losses(output: Path) -> list[float]:
    with (output / "train_log.csv").open() as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_short_run_writes_a_loadable_model_dir_and_logs(small_cache, tmp_path) -> None:
    from hermes.models.registry import load_model

    cfg = _config(small_cache, tmp_path / "run", steps=3, validation={"every_steps": 3})
    result = train(cfg, progress=False)
    out = tmp_path / "run"
    assert result.steps == 3 and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))
    for name in ("config.yaml", "train_log.csv", "val_log.csv", "progress.png", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert len(_losses(out)) == 3
    model, bundle = load_model(result.model_dir)
    assert (result.model_dir / "catalog.yaml").is_file()
    assert bundle.patch_size == [32, 32, 32]
    assert len(bundle.task_names) == bundle.network.num_tasks
    assert set(bundle.preprocessing.datasets) == {d["name"] for d in bundle.datasets}
    assert bundle.preprocessing.modalities["CT"]["modality"] == "CT"
    ckpt = load_checkpoint(checkpoint_path(out))
    # final_weights "best": both candidates were validated and the saved weights are the winner's
    chosen = bundle.training.final_weights
    scores = bundle.training.validation_dice_by_weights
    assert set(scores) == {"ema", "raw"}
    means = {name: sum(d.values()) / len(d) for name, d in scores.items()}
    assert chosen == ("raw" if means["raw"] > means["ema"] else "ema")
    saved = ckpt["ema"] if chosen == "ema" else ckpt["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert set(result.val_dice) == set(bundle.training.validation_dice)
    # the held-out cases are recorded (hermes evaluate --split val), and the fallback for older
    # models (the seeded split redone from the recorded config) finds the same cases
    from hermes.bundle import TrainingRecord
    from hermes.data.cache import open_cache
    from hermes.evaluation.evaluate import validation_case_ids

    recorded = bundle.training.validation_cases
    all_train = open_cache(cfg.cache).train_cases()
    assert recorded and any(recorded.values())
    older = TrainingRecord(config=bundle.training.config)
    for name, ids in recorded.items():
        assert set(ids) < set(all_train[name])
        assert validation_case_ids(older, name, all_train[name]) == ids


@pytest.mark.parametrize("final_weights", ["ema", "raw"])
def test_final_weights_option_saves_the_named_weights(small_cache, tmp_path, final_weights) -> None:
    from hermes.models.registry import load_model

    out = tmp_path / final_weights
    cfg = _config(small_cache, out, steps=2, data=NO_VALIDATION, final_weights=final_weights)
    result = train(cfg, progress=False)
    model, bundle = load_model(result.model_dir)
    ckpt = load_checkpoint(checkpoint_path(out))
    assert bundle.training.final_weights == final_weights
    saved = ckpt["ema"] if final_weights == "ema" else ckpt["model"]
    other = ckpt["model"] if final_weights == "ema" else ckpt["ema"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in other.items())


def test_resume_repeats_the_uninterrupted_run_exactly(small_cache, tmp_path, monkeypatch) -> None:
    import random

    import numpy as np

    import hermes.training.trainer as trainer_module

    # A stochastic layer (dropout, a user's augmentation) draws from the global generators
    # during each step; a resumed run must see the draws the uninterrupted run saw.
    draws: list[tuple[float, float, float]] = []
    real_step = trainer_module.train_step

    def step_with_global_draws(*args, **kwargs):
        draws.append((float(torch.rand(1)), float(np.random.rand()), random.random()))
        return real_step(*args, **kwargs)

    def seed_globals(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    monkeypatch.setattr(trainer_module, "train_step", step_with_global_draws)
    seed_globals(1)
    straight = train(_config(small_cache, tmp_path / "a", steps=3, data=NO_VALIDATION), progress=False)
    straight_draws, draws[:] = list(draws), []
    real_save = trainer_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["step"] == 2:
            raise KeyboardInterrupt  # killed right after the mid-run checkpoint

    seed_globals(1)
    with monkeypatch.context() as dying, pytest.raises(KeyboardInterrupt):
        dying.setattr(trainer_module, "save_checkpoint", save_then_die)
        train(_config(small_cache, tmp_path / "b", steps=3, data=NO_VALIDATION), progress=False)
    assert load_checkpoint(checkpoint_path(tmp_path / "b"))["step"] == 2
    draws[:] = []
    seed_globals(99)  # a new process starts with other global states
    resumed = train(_config(small_cache, tmp_path / "b", steps=3, data=NO_VALIDATION), resume=True, progress=False)
    assert resumed.steps == 3
    assert draws == straight_draws[2:]  # torch, numpy and Python generators all restored
    assert resumed.losses == straight.losses[2:]  # bit-identical, not approximately equal
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # the log has no duplicate rows
    a = load_checkpoint(checkpoint_path(tmp_path / "a"))
    b = load_checkpoint(checkpoint_path(tmp_path / "b"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    # --extend-steps goes past the plan on purpose, with a re-planned (non-zero) LR
    extended = train(_config(small_cache, tmp_path / "b", steps=3, data=NO_VALIDATION), extend_steps=1, progress=False)
    assert extended.steps == 4 and len(extended.losses) == 1
    last = list(csv.DictReader((tmp_path / "b" / "train_log.csv").open()))[-1]
    assert float(last["step"]) == 4 and float(last["lr"]) > 0


def test_resume_of_a_finished_run_and_output_guard(small_cache, tmp_path) -> None:
    cfg = _config(small_cache, tmp_path / "r", steps=1, data=NO_VALIDATION)
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, progress=False)
    again = train(cfg, resume=True, progress=False)  # nothing left to do: re-saves the model
    assert again.steps == 1 and again.losses == []
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(_config(small_cache, tmp_path / "empty"), resume=True, progress=False)
    changed = _config(small_cache, tmp_path / "r", data={**NO_VALIDATION, "patch_size": [48, 48, 48]})
    with pytest.raises(ConfigError, match="patch_size"):
        train(changed, resume=True, progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data": {"patch_size": [40, 32, 32]}}, "not a multiple of 16"),
        ({"paradigm": "traditional", "dataset": "NoSuchSet"}, "unknown dataset 'NoSuchSet'"),
        ({"cache": "/nonexistent/cache"}, "cache not found"),
        ({"catalog": "/nonexistent/catalog.yaml"}, "catalog file not found"),
        ({"medcontext": {"enabled": True, "exclude_tasks": ["no_such_task"]}}, "no_such_task"),
    ],
)
def test_config_errors_before_training(small_cache, tmp_path, overrides, message) -> None:
    with pytest.raises(HermesError, match=message):
        train(_config(small_cache, tmp_path / "x", **overrides), progress=False)
    assert not (tmp_path / "x" / "train_log.csv").exists()


def test_unknown_key_and_preset_in_yaml(small_cache, tmp_path) -> None:
    catalog, cache = small_cache
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"preset": "cpu-demo", "catalog": str(catalog), "cache": str(cache),
                                    "output": "out", "optim": {"lr_typo": 1}}))
    with pytest.raises(ConfigError, match=r"optim\.lr_typo"):
        load_train_config(path)
    path.write_text(yaml.safe_dump({"preset": "cpu-demo", "catalog": str(catalog), "cache": str(cache), "output": "out"}))
    cfg = load_train_config(path)
    assert cfg.model.preset == "tiny" and cfg.output == (tmp_path / "out").resolve()
    path.write_text(yaml.safe_dump({"preset": "paper", "catalog": str(catalog), "cache": str(cache), "output": "o"}))
    paper = load_train_config(path)
    assert paper.data.patch_size == [128, 128, 128] and paper.optim.lr == 2e-3 and paper.model.preset == "base"


def test_traditional_and_medcontext_resume(small_cache, tmp_path) -> None:
    """A per-dataset baseline with MedContext: the teacher is checkpointed and restored."""
    overrides = {
        "paradigm": "traditional",
        "dataset": "LiverCT",
        "model": {"architecture": "resunet", "preset": "tiny"},
        "medcontext": {"enabled": True, "mask_patch": [8, 8, 8]},
        "data": NO_VALIDATION,
        "steps": 2,
    }
    first = train(_config(small_cache, tmp_path / "mc", **overrides), progress=False)
    state = load_checkpoint(checkpoint_path(tmp_path / "mc"))
    assert state["medcontext"]["last_update_step"] == 1
    teacher = state["medcontext"]["teacher"]
    log = list(csv.DictReader((tmp_path / "mc" / "train_log.csv").open()))
    assert {"masked_supervised", "consistency"} <= set(log[0])
    # step 0 is a term-gradient step (medcontext.term_gradients_every): the shares are logged
    shares = [float(log[0][f"grad_share_{n}"]) for n in ("supervised", "masked_supervised", "consistency")]
    assert all(0.0 <= v <= 1.0 for v in shares) and abs(sum(shares) - 1.0) < 1e-5
    more = train(_config(small_cache, tmp_path / "mc", **overrides), extend_steps=1, progress=False)
    assert more.steps == 3 and len(first.losses) == 2
    after = load_checkpoint(checkpoint_path(tmp_path / "mc"))["medcontext"]["teacher"]
    assert any(not torch.equal(teacher[k], after[k]) for k in teacher if teacher[k].is_floating_point())
    spec = json.loads((tmp_path / "mc" / "model" / "spec.json").read_text())
    assert spec["paradigm"] == "traditional" and [d["name"] for d in spec["datasets"]] == ["LiverCT"]


def test_medcontext_cosine_teacher_momentum_gets_the_planned_steps(small_cache, tmp_path, monkeypatch) -> None:
    """The trainer tells MedContext the planned run length (the cosine momentum schedule needs
    it; without it the first teacher update raises), and logs the terms' effective weights."""
    from hermes.training.medcontext import MedContext

    planned: list[int] = []
    original = MedContext.set_total_steps
    monkeypatch.setattr(MedContext, "set_total_steps", lambda self, n: (planned.append(n), original(self, n)))
    overrides = {
        "paradigm": "traditional",
        "dataset": "LiverCT",
        "model": {"architecture": "resunet", "preset": "tiny"},
        "medcontext": {"enabled": True, "mask_patch": [8, 8, 8], "teacher_momentum_schedule": "cosine",
                       "masked_rampup_steps": 2, "term_gradients_every": None},
        "data": NO_VALIDATION,
        "steps": 2,
    }
    train(_config(small_cache, tmp_path / "cos", **overrides), progress=False)
    assert planned == [2]
    log = list(csv.DictReader((tmp_path / "cos" / "train_log.csv").open()))
    assert [float(r["weight_masked_supervised"]) for r in log] == [0.0, 0.5]  # masked_rampup_steps 2


def test_compile_option_trains_through_torch_compile(small_cache, tmp_path, monkeypatch) -> None:
    """`compile: true` runs the steps through torch.compile (dynamo traces the real network; the
    "eager" backend skips inductor's minutes of code generation) and still saves a model."""
    real_compile = torch.compile
    compiled: list[torch.nn.Module] = []

    def eager_compile(module: torch.nn.Module, **kwargs: Any) -> Any:
        compiled.append(module)
        return real_compile(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    cfg = _config(small_cache, tmp_path / "run", steps=2, compile=True, validation={"every_steps": 2})
    result = train(cfg, progress=False)
    assert len(compiled) == 1 and result.steps == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "run" / "model").is_dir()
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1  # the network was traced, not run eagerly
    assert not _config(small_cache, tmp_path / "other").compile  # off unless asked for
