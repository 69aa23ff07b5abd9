"""Data-parallel training: one process per device under ``torchrun``, DDP, rank-0-only writes.

``hermes train CONFIG`` and ``torchrun --nproc_per_node N -m hermes.cli train CONFIG`` run the
same code: :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), picks NCCL on CUDA and gloo on CPU, and returns a :class:`DistContext` that
the trainer passes to the loader (each rank samples its own shard of batches) and consults
before writing anything (only rank 0 writes logs, checkpoints and the model).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hermes.runtime import choose_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of ``value`` over ranks (for logging; a copy, the input is untouched)."""
        if not self.enabled:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on at least one rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def init_distributed(timeout_minutes: float = 30.0, device: str | None = None) -> DistContext:
    """Join the process group if launched by torchrun (``WORLD_SIZE`` > 1); otherwise single process.
    ``device``: see :func:`choose_device` (default: CUDA when available)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = choose_device(device, local_rank, world_size)
    if world_size <= 1:
        return DistContext(device=chosen)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if chosen.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def find_unused_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters that received no gradient in the last backward pass.

    Called once after a probe step: DDP needs ``find_unused_parameters=True`` (slower: it
    traverses the graph every step) only if some parameter is not used, so we ask instead of
    always paying for it as the reference code does.
    """
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def wrap_model(model: nn.Module, ctx: DistContext, find_unused: bool = False) -> nn.Module:
    """DDP-wrap ``model`` when running distributed; return it unchanged otherwise."""
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused
    )
