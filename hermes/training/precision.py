"""Mixed precision for training: which autocast dtype, whether a GradScaler, which memory layout.

``precision: auto`` picks, per device:

* CUDA: bf16 where the GPU supports it (no loss scaling needed), else fp16 + GradScaler.
* CPU: bf16 autocast + channels_last_3d when the CPU has native bf16 units (AMX / AVX512-BF16,
  queried from oneDNN), fp32 otherwise (emulated bf16 is slower than fp32). On this project's
  reference machine (Xeon with AMX) a training step of the tiny and small Hermes-R was measured
  faster with bf16 + channels_last (docs/bench/training.md, ``bench/training_precision.py``).

fp16 needs CUDA: on CPU it is a configuration error, not a silent fallback.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from hermes.errors import ConfigError


def cpu_has_native_bf16() -> bool:
    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@dataclass(frozen=True)
class AmpSettings:
    dtype: torch.dtype | None  # autocast dtype; None = plain fp32
    use_scaler: bool  # fp16 on CUDA
    channels_last: bool
    device_type: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.use_scaler else None


def resolve_amp(
    precision: Literal["auto", "fp32", "bf16", "fp16"],
    channels_last: bool | Literal["auto"],
    device: torch.device,
) -> AmpSettings:
    """Turn the config's ``precision``/``channels_last`` into concrete settings for ``device``."""
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision: fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision: bf16 is not supported by this GPU (use fp16 or auto)")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if channels_last == "auto":
        # oneDNN's CPU convolutions are faster channels-last (and bf16 needs it to avoid
        # reorders); cuDNN picks its own layouts, so CUDA stays contiguous.
        channels_last = not cuda
    return AmpSettings(dtype, precision == "fp16", bool(channels_last), device.type)
