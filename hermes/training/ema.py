"""Exponential moving average of the model, used for validation and saved as the final weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


class ModelEMA:
    """``ema <- d * ema + (1 - d) * model`` after every optimiser step, with the warm-up
    ``d = min(1 - 1/(step + 1), decay)`` of the Hermes reference (step 0 copies the model, so
    the average is not dominated by the random initialisation early in training).

    Floating-point parameters **and buffers** are averaged (a BatchNorm's running statistics
    must follow its weights); integer buffers (e.g. ``num_batches_tracked``) are copied. The
    copy lives in eval mode with ``requires_grad=False``, on the model's device; ``module`` is
    the averaged network (MedContext may reuse it as its teacher).
    """

    def __init__(self, model: nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def cap_window(self, total_steps: int, fraction: float | None) -> None:
        """Limit the averaging window ``1 / (1 - decay)`` to ``fraction`` of a ``total_steps`` run."""
        if fraction is not None:
            window = max(2.0, fraction * total_steps)
            self.decay = min(self.decay, 1.0 - 1.0 / window)

    def decay_at(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 1), self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average in ``model`` after optimiser step ``step`` (0-based)."""
        d = self.decay_at(step)
        ema_state = self.module.state_dict()
        averaged: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for name, value in unwrap(model).state_dict().items():
            target = ema_state[name]
            if not target.dtype.is_floating_point:
                target.copy_(value)
            elif value.dtype == target.dtype and value.device == target.device:
                averaged.append(target)
                sources.append(value.detach())
            else:
                target.lerp_(value.detach().to(target), 1.0 - d)
        if averaged:
            # one multi-tensor kernel instead of one lerp per tensor
            torch._foreach_lerp_(averaged, sources, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
