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
