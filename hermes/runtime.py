"""Where and in what precision the network runs: the one owner of device and precision rules.

Training, inference and adaptation all ask this module, so "auto" means the same everywhere:

* device: CUDA when available (under torchrun, this process's GPU by LOCAL_RANK), else CPU;
* precision: on CUDA bf16 where the GPU supports it, else fp16 + GradScaler; on CPU bf16 autocast
  when the CPU has native bf16 units (AMX / AVX512-BF16, queried from oneDNN), fp32 otherwise
  (emulated bf16 is slower than fp32). Measured on this project's reference machine (Xeon with
  AMX): bf16 + channels-last is faster for both training and inference (docs/bench/training.md,
  docs/bench/inference.md). fp16 needs CUDA: on CPU it is a configuration error, not a silent
  fallback;
* memory layout: channels_last_3d on CPU (oneDNN's convolutions are faster in it and bf16 needs it
  to avoid reorders); contiguous on CUDA, where cuDNN picks its own layouts;
* CPU threads (training, ``cpu_threads: auto``): :class:`ThreadTuner` measures the step time with
  all of torch's threads and with one fewer, and keeps the faster, re-checking as it goes
  (docs/bench/busy_core.md).
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from hermes.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
ChannelsLast = bool | Literal["auto"]


def cpu_has_native_bf16() -> bool:
    """True when oneDNN can run bf16 convolutions natively on this CPU."""
    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------
def default_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def choose_device(
    requested: str | torch.device | None, local_rank: int = 0, world_size: int = 1
) -> torch.device:
    """``None``/"auto" -> :func:`default_device`; "cpu"; "cuda" (under torchrun: this process's GPU
    by LOCAL_RANK); "cuda:N" (single process only). Raises a ConfigError naming the problem when
    the request cannot be met."""
    if requested is None or str(requested) == "auto":
        return default_device(local_rank)
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {requested!r}: not a device this project runs on (cpu, cuda, cuda:N or auto)")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {requested}: CUDA was requested but is not available (torch {torch.__version__}, "
            "no visible GPU); use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device("cuda", local_rank % count)
    if world_size > 1:
        raise ConfigError(
            f"--device {requested}: under torchrun each process takes its GPU from LOCAL_RANK; pass --device cuda"
        )
    if device.index >= count:
        raise ConfigError(f"--device {requested}: there are only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


# --------------------------------------------------------------------------------------------
# Precision and layout
# --------------------------------------------------------------------------------------------
def resolve_autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device`` (None = plain float32); see the module docstring."""
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
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision: {precision!r} is not one of auto, fp32, bf16, fp16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_channels_last(channels_last: ChannelsLast, device: torch.device) -> bool:
    if channels_last == "auto":
        return device.type == "cpu"
    return bool(channels_last)


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


def resolve_amp(precision: Precision, channels_last: ChannelsLast, device: torch.device) -> AmpSettings:
    """The config's ``precision``/``channels_last`` as concrete settings for ``device``."""
    dtype = resolve_autocast_dtype(precision, device)
    return AmpSettings(dtype, dtype is torch.float16, resolve_channels_last(channels_last, device), device.type)


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    """Move a batch's tensors to ``device``; the image in the network's memory layout."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if channels_last and isinstance(moved.get("image"), torch.Tensor):
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last_3d)
    return moved


@dataclass
class ThreadTuner:
    """Chooses torch's intra-op thread count on CPU from measured training-step times.

    Why: intra-op threads wait for each other at every parallel region, so when another process
    takes one core, the thread sharing that core holds all the others back. Measured on this
    project's 2-core machine (docs/bench/busy_core.md, demo step): 2 threads 2.43 steps/s idle
    but 0.70 with one CPU-bound neighbour, 1 thread 1.52 idle and 1.51 with the neighbour. No
    fixed setting is best in both cases, and the load changes during a long run, so the tuner
    measures: it times ``probe_steps`` steps with each candidate (``ceiling`` threads and one
    fewer; the first step after a switch is not counted), keeps the faster for ``hold_steps``
    steps, then measures again. Probing the current choice costs nothing; the other candidate
    costs at most ``probe_steps + 1`` slower steps per cycle.

    ``ceiling`` is the thread count the process was given (``OMP_NUM_THREADS`` or torch's
    default): the tuner never goes above it, so a benchmark that pins one thread per job is
    left alone (a single candidate: the tuner is disabled).
    """

    ceiling: int
    probe_steps: int = 4
    hold_steps: int = 100
    threads: int = field(init=False)
    candidates: list[int] = field(init=False)
    history: list[tuple[int, int]] = field(init=False, default_factory=list)  # (step, threads) chosen
    _queue: list[int] = field(init=False, default_factory=list)  # candidates left to probe
    _times: list[float] = field(init=False, default_factory=list)
    _results: dict[int, float] = field(init=False, default_factory=dict)
    _held: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.candidates = [self.ceiling] if self.ceiling <= 1 else [self.ceiling, self.ceiling - 1]
        self.threads = self.ceiling
        self._queue = list(self.candidates)

    @property
    def enabled(self) -> bool:
        return len(self.candidates) > 1

    def _use(self, threads: int) -> None:
        if threads != self.threads:
            self.threads = threads
            torch.set_num_threads(threads)

    def step_done(self, step: int, seconds: float) -> int:
        """Record the compute time of training step ``step``; sets and returns the thread count
        for the next step."""
        if not self.enabled:
            return self.threads
        if not self._queue:  # holding the last choice
            self._held += 1
            if self._held >= self.hold_steps:  # measure again, the current choice first (no switch)
                self._held = 0
                self._queue = [self.threads] + [c for c in self.candidates if c != self.threads]
                self._times = []
            return self.threads
        self._times.append(seconds)
        if len(self._times) > self.probe_steps:  # the first step after a switch is not counted
            self._results[self._queue.pop(0)] = statistics.median(self._times[1:])
            self._times = []
            if self._queue:
                self._use(self._queue[0])
            else:
                best = min(self._results, key=self._results.__getitem__)
                self._use(best)
                self.history.append((step + 1, best))
                self._results = {}
        return self.threads
