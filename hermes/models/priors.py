"""Context-prior pools: the learnable tokens that tell the network *what* to segment *in what*.

Hermes conditions a shared network on the identity of the data it sees. Each fusion stage owns
its own pools (the paper's stages learn independent tokens, at the stage's width):

* a **task pool** with one token per global task ``0..T-1`` plus an explicit **NULL** token at
  index ``T`` used for padded task slots (the reference code reached it by indexing with -1);
* a **modality pool** with ``modality_tokens`` tokens per modality ``0..M-1`` plus an explicit
  **UNKNOWN** entry at index ``M`` (any MR sequence outside the vocabulary).

Selection is a single vectorised gather (the reference loops over the batch in Python). Padded
task slots always select NULL, whatever id the caller put there, and are reported in a
validity mask so attention can ignore them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hermes.errors import ModelError


@dataclass
class PriorTokens:
    """The prior tokens handed to one fusion stage.

    ``tokens`` is (B, T + L, C): the T selected task tokens first, then the L modality tokens.
    ``key_mask`` is (B, T + L) bool, False on padded task slots: those tokens must not be read
    by the image features (attention keys), so padding never changes a real task's output.
    """

    tokens: Tensor
    key_mask: Tensor
    num_task_tokens: int


def task_validity(task_ids: Tensor, null_task_id: int, task_mask: Tensor | None = None) -> Tensor:
    """(B, T) bool, True on real task slots: the given mask, else every slot not holding NULL."""
    if task_mask is None:
        return task_ids != null_task_id
    if task_mask.shape != task_ids.shape:
        raise ValueError(
            f"task_mask shape {tuple(task_mask.shape)} != task_ids shape {tuple(task_ids.shape)}"
        )
    return task_mask.bool()


def tracing() -> bool:
    """True under ONNX/torch.export and torch.compile: value checks on tensors are data-dependent
    there (a graph break each step under compile), so the model skips them; shape checks still
    hold, and the training loader only produces ids of the model's catalog."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def check_ids(task_ids: Tensor, modality_id: Tensor, num_tasks: int, num_modalities: int) -> None:
    """Raise a :class:`ModelError` naming the bad id instead of an opaque indexing error."""
    if task_ids.ndim != 2:
        raise ValueError(f"task_ids must be (B, T), got shape {tuple(task_ids.shape)}")
    if modality_id.ndim != 1 or modality_id.shape[0] != task_ids.shape[0]:
        raise ValueError(
            f"modality_id must be (B,) with B={task_ids.shape[0]}, got shape {tuple(modality_id.shape)}"
        )
    if tracing():
        return
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) > num_tasks):
        raise ModelError(
            f"task ids must be in 0..{num_tasks} ({num_tasks} = null/padding), got "
            f"{sorted(set(task_ids.flatten().tolist()))}: the model was built for {num_tasks} tasks"
        )
    if modality_id.numel() and (int(modality_id.min()) < 0 or int(modality_id.max()) > num_modalities):
        raise ModelError(
            f"modality ids must be in 0..{num_modalities} ({num_modalities} = unknown), got "
            f"{sorted(set(modality_id.tolist()))}"
        )


class PriorPool(nn.Module):
    """The task and modality tokens of one fusion stage, at that stage's width."""

    def __init__(self, width: int, num_tasks: int, num_modalities: int, modality_tokens: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.num_modalities = num_modalities
        # Row `num_tasks` is the NULL token (padding); Xavier-uniform as in the reference.
        self.task_tokens = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_tasks + 1, width)))
        self.modality_tokens: nn.Parameter | None = None
        if modality_tokens > 0:
            # Entry `num_modalities` is the UNKNOWN modality prior.
            pool = torch.empty(num_modalities + 1, modality_tokens, width)
            self.modality_tokens = nn.Parameter(nn.init.xavier_uniform_(pool))

    @property
    def null_task_id(self) -> int:
        return self.num_tasks

    @property
    def unknown_modality_id(self) -> int:
        return self.num_modalities

    def forward(self, task_ids: Tensor, valid: Tensor, modality_id: Tensor) -> PriorTokens:
        """Gather (B, T) task tokens (NULL on invalid slots) and (B, L) modality tokens."""
        ids = torch.where(valid, task_ids, torch.full_like(task_ids, self.null_task_id))
        tokens = self.task_tokens[ids]  # (B, T, C), one gather for the whole batch
        key_mask = valid
        if self.modality_tokens is not None:
            modality = self.modality_tokens[modality_id]  # (B, L, C)
            tokens = torch.cat([tokens, modality], dim=1)
            always = torch.ones(modality.shape[:2], dtype=torch.bool, device=valid.device)
            key_mask = torch.cat([valid, always], dim=1)
        return PriorTokens(tokens=tokens, key_mask=key_mask, num_task_tokens=task_ids.shape[1])


class ContextPriors(nn.Module):
    """Independent prior pools, one per fusion stage (stage name -> width)."""

    def __init__(
        self, stage_widths: Mapping[str, int], num_tasks: int, num_modalities: int, modality_tokens: int
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ModelError(f"a Hermes model needs at least one task, got num_tasks={num_tasks}")
        self.num_tasks = num_tasks
        self.num_modalities = num_modalities
        self.pools = nn.ModuleDict(
            {
                stage: PriorPool(width, num_tasks, num_modalities, modality_tokens)
                for stage, width in stage_widths.items()
            }
        )

    @property
    def null_task_id(self) -> int:
        return self.num_tasks

    @property
    def unknown_modality_id(self) -> int:
        return self.num_modalities

    def forward(self, task_ids: Tensor, valid: Tensor, modality_id: Tensor) -> dict[str, PriorTokens]:
        return {stage: pool(task_ids, valid, modality_id) for stage, pool in self.pools.items()}
