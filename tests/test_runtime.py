"""hermes/runtime.py: one set of device, precision and layout rules for training, inference and
adaptation. CUDA branches are exercised with the CUDA queries patched, so they run on CPU CI."""

from __future__ import annotations

import pytest
import torch

from hermes import runtime
from hermes.errors import ConfigError
from hermes.runtime import resolve_amp, resolve_autocast_dtype, resolve_channels_last, to_device

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    amp = resolve_amp("auto", "auto", CPU)
    assert amp.dtype is (torch.bfloat16 if native else None)
    assert amp.name == ("bf16" if native else "fp32")
    assert amp.channels_last and not amp.use_scaler


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_auto_on_cuda(monkeypatch: pytest.MonkeyPatch, bf16_gpu: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    amp = resolve_amp("auto", "auto", CUDA)
    assert amp.dtype is (torch.bfloat16 if bf16_gpu else torch.float16)
    assert amp.use_scaler is (not bf16_gpu)  # fp16 needs loss scaling, bf16 does not
    assert not amp.channels_last  # cuDNN chooses its own layout
    assert amp.device_type == "cuda"
    if not bf16_gpu:
        with pytest.raises(ConfigError, match="bf16 is not supported by this GPU"):
            resolve_autocast_dtype("bf16", CUDA)


def test_explicit_precisions_and_errors() -> None:
    assert resolve_autocast_dtype("fp32", CPU) is None
    assert resolve_autocast_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_autocast_dtype("fp16", CPU)
    with pytest.raises(ConfigError, match="not one of"):
        resolve_autocast_dtype("int8", CPU)  # type: ignore[arg-type]
    assert resolve_channels_last(True, CUDA) and not resolve_channels_last(False, CPU)


def test_training_and_inference_share_the_rules() -> None:
    """The modules that used to carry their own copies now import these."""
    from hermes.adaptation import engine, finetune
    from hermes.inference import predictor, sliding_window
    from hermes.training import distributed, plan, trainer

    assert trainer.resolve_amp is engine.resolve_amp is runtime.resolve_amp
    assert trainer.to_device is engine.to_device is runtime.to_device
    assert predictor.choose_device is finetune.choose_device is distributed.choose_device is runtime.choose_device
    assert sliding_window.resolve_autocast_dtype is runtime.resolve_autocast_dtype
    assert plan.AmpSettings is runtime.AmpSettings
    # ... and both loops run the same optimisation step (hermes/training/step.py)
    assert trainer.train_step is engine.train_step


def test_to_device_moves_tensors_and_sets_the_image_layout() -> None:
    batch = {"image": torch.zeros(2, 1, 4, 4, 4), "mask": torch.ones(2, 3, 4, 4, 4), "names": ["a", "b"]}
    moved = to_device(batch, CPU, channels_last=True)
    assert moved["image"].is_contiguous(memory_format=torch.channels_last_3d)
    assert moved["mask"].is_contiguous() and moved["names"] == ["a", "b"]
    assert to_device(batch, CPU, channels_last=False)["image"].is_contiguous()


# ----------------------------------------------------------------------------------------------
# CPU thread tuner (cpu_threads: auto)
# ----------------------------------------------------------------------------------------------
def _drive(tuner: runtime.ThreadTuner, seconds_by_threads: dict[int, float], steps: int) -> list[int]:
    """Run ``steps`` fake steps whose time depends on the thread count in use; returns the count
    used at every step."""
    used = []
    for step in range(steps):
        used.append(tuner.threads)
        tuner.step_done(step, seconds_by_threads[tuner.threads])
    return used


def test_thread_tuner_drops_a_thread_when_that_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    tuner = runtime.ThreadTuner(2, probe_steps=3, hold_steps=10)
    # a busy neighbour: 2 threads 1.35 s per step, 1 thread 0.6 s (docs/bench/busy_core.md)
    used = _drive(tuner, {2: 1.35, 1: 0.6}, 40)
    assert used[:4] == [2, 2, 2, 2] and used[4:8] == [1, 1, 1, 1]  # 1 + 3 timed steps each
    # held for 10 steps, then re-probed with the choice first (no switch), then the other
    # candidate again (the neighbour may have gone), then back to the faster one
    assert used[8:22] == [1] * 14 and used[22:26] == [2] * 4 and used[26:] == [1] * 14
    assert calls[:3] == [1, 2, 1] and tuner.history == [(8, 1), (26, 1)]


def test_thread_tuner_keeps_all_threads_on_an_idle_machine_and_re_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    tuner = runtime.ThreadTuner(4, probe_steps=2, hold_steps=5)
    used = _drive(tuner, {4: 0.4, 3: 0.5}, 30)
    assert used[:3] == [4, 4, 4] and used[3:6] == [3, 3, 3] and used[6:11] == [4] * 5
    assert used.count(3) > 3  # the slower candidate is measured again after each hold
    assert calls[:2] == [3, 4] and all(choice == 4 for _, choice in tuner.history)


def test_thread_tuner_is_off_with_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark that pins one thread per job (OMP_NUM_THREADS=1) is left alone."""
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    tuner = runtime.ThreadTuner(1)
    assert not tuner.enabled and _drive(tuner, {1: 1.0}, 20) == [1] * 20 and calls == []


def test_trainer_thread_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from hermes.config import TrainConfig
    from hermes.training.distributed import DistContext
    from hermes.training.trainer import _thread_tuner

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    base = {"catalog": Path("c.yaml"), "cache": Path("c"), "output": Path("o")}
    cpu = DistContext(device=CPU)
    assert TrainConfig(**base).cpu_threads == "auto"
    assert _thread_tuner(TrainConfig(**base), cpu) is not None
    assert _thread_tuner(TrainConfig(**base, deterministic=True), cpu) is None
    assert _thread_tuner(TrainConfig(**base, cpu_threads=3), cpu) is None and calls == [3]
    assert _thread_tuner(TrainConfig(**base), DistContext(device=CUDA)) is None
    with pytest.raises(ValueError):
        TrainConfig(**base, cpu_threads=0)
