"""MedContext (Gani et al., MICCAI 2024) as a training option for any segmentation network.

Each training step adds a second student pass on a masked copy of the input. That pass is
supervised twice: by the ground truth (masked supervision) and by a teacher's prediction on the
clean input (consistency). The network must therefore infer hidden anatomy from its context,
in segmentation space, with no extra head and no inference cost.

Decisions that differ from the reference code (docs/medcontext.md explains each one):

* Masking happens in **input space**, not on patch tokens. Any network works unchanged, and
  no full-resolution skip can leak the hidden content to the decoder (the reference UNETR leaks).
* **One mask per sample**, made of grid-aligned cubes of ``mask_patch`` voxels (or, with
  ``mask_shape: tubes``, x-y cells hidden through the whole z extent). The grid has a random
  offset per sample, so mask borders land anywhere. Exactly ``round(ratio * n_cells)`` cells
  are hidden.
* The consistency term is an **fp32 MSE between sigmoid probabilities**, averaged over voxels
  and over the sample's own tasks. The reference divides a raw-logit MSE by the norm of the
  whole teacher tensor, which leaves the term near 1e-5 and makes it inert.
* The teacher is a true EMA of the student, updated every optimiser step. Its momentum is
  scheduled by the global step, and it averages parameters **and** buffers. It runs in eval
  mode with ``requires_grad=False`` and is never DDP-wrapped.
* Tasks in ``exclude_tasks`` (lesions that context cannot predict) are never asked to predict
  inside hidden voxels, neither by the ground truth nor by the teacher.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from hermes.config import MedContextConfig
from hermes.errors import ConfigError, ModelError

SupervisedLossFn = Callable[..., Tensor]
"""``supervised_loss_fn(logits, target, task_mask, voxel_weight=None) -> Tensor`` (the trainer's
partial-label loss; ``voxel_weight`` is ``None`` or a float map broadcastable to ``logits``)."""


class _HasModule(Protocol):
    module: nn.Module


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the bare network behind DDP / DataParallel / ``torch.compile`` wrappers.

    The teacher must be a plain module. A DDP-wrapped teacher would all-reduce gradients it
    never has, and the reference's ``--distributed`` path fails on exactly that.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _logits_of(output: Any) -> Tensor:
    """Hermes models return an object with ``.logits``; also accept a bare tensor, so that any
    network works as a student."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor):
        raise TypeError(f"model output has no tensor `.logits` (got {type(output).__name__})")
    return logits


def resolve_task_names(requested: list[str], task_names: list[str]) -> list[int]:
    """Map task names, or unambiguous short names, to task ids.

    The short name is the part after the last ``/``, e.g. ``tumor`` for
    ``Dataset103_Liver/tumor``. An ambiguous short name is an error rather than a silent "all of
    them": two datasets' "tumor" tasks are different protocols, so the user should name both.
    """
    ids: list[int] = []
    for name in requested:
        if name in task_names:
            ids.append(task_names.index(name))
            continue
        matches = [i for i, full in enumerate(task_names) if full.rsplit("/", 1)[-1] == name]
        if len(matches) == 1:
            ids.append(matches[0])
        elif not matches:
            raise ConfigError(
                f"medcontext.exclude_tasks: unknown task {name!r}; known tasks: {', '.join(task_names)}"
            )
        else:
            raise ConfigError(
                f"medcontext.exclude_tasks: short name {name!r} is ambiguous, it matches "
                f"{', '.join(task_names[i] for i in matches)}; write the full task names"
            )
    return sorted(set(ids))


def teacher_momentum_at(step: int, momentum: float) -> float:
    """EMA momentum after optimiser step ``step`` (0-based global step).

    This is the Hermes warm-up ``min(1 - 1/(step+1), momentum)``. Early on the teacher is the
    running mean of all student iterates, so it does not stay near the random initialisation
    for the first ~1/(1-momentum) steps (250 at 0.996). That matters in few-shot runs of a few
    hundred steps. The reference indexes its DINO cosine schedule with the wrong counter, so it
    never reaches its intended momentum at all.
    """
    return min(1.0 - 1.0 / (step + 1), momentum)


def cosine_momentum_at(step: int, start: float, final: float, total_steps: int) -> float:
    """EMA momentum of the cosine schedule (BYOL, DINO): ``start`` at step 0, ``final`` at the
    run's last step ``total_steps - 1`` (and after it), along a half cosine in between.

    Unlike :func:`teacher_momentum_at` there is no ``1 - 1/(step+1)`` warm-up: the teacher
    starts as a slow average (of the student's initial weights, which it was copied from).
    """
    if total_steps < 1:
        raise ValueError(f"the cosine momentum schedule needs total_steps >= 1, got {total_steps}")
    progress = min(1.0, max(0.0, step / (total_steps - 1))) if total_steps > 1 else 1.0
    return final - (final - start) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Floor of the consistency value that `consistency_target_fraction` divides by. Below it (an RMS
# probability difference under 1 %) the weight stops growing, so a masked prediction that
# already matches the teacher (e.g. mask_ratio 0 early in a run) is not amplified without bound.
CONSISTENCY_FLOOR = 1e-4


class MedContext:
    """Masked-context training: mask generator, EMA teacher and the two extra loss terms.

    The trainer calls, per step::

        masked, hidden = mc.mask(image, generator)
        out_m = model(masked, task_ids, modality_id, task_mask)
        t = mc.teacher_probabilities(image, task_ids, modality_id, task_mask)
        losses = mc.loss(out_m.logits, t, target, task_ids, task_mask, hidden, step, seg_loss,
                         supervised=clean_seg)  # clean_seg: needed by consistency_target_fraction
        (seg + modality + losses["total"]).backward(); optimizer.step()
        mc.update_teacher(model, step)  # after mc.set_total_steps(n) once (cosine momentum)

    Keep the masked pass out of the modality loss, otherwise the modality classifier learns the
    mask artefact.
    """

    def __init__(
        self,
        config: MedContextConfig,
        model: nn.Module,
        task_names: list[str],
        ema: _HasModule | nn.Module | None = None,
    ) -> None:
        self.config = config
        self.task_names = list(task_names)
        self.excluded_task_ids = resolve_task_names(list(config.exclude_tasks), self.task_names)
        self.mask_patch = tuple(int(p) for p in config.mask_patch)
        if min(self.mask_patch) < 1:
            raise ConfigError(f"medcontext.mask_patch must be positive voxel counts, got {config.mask_patch}")
        if not 0.0 <= config.mask_ratio <= 1.0:
            raise ConfigError(f"medcontext.mask_ratio must be in [0, 1], got {config.mask_ratio}")
        self.reuses_ema = bool(config.reuse_validation_ema)
        if self.reuses_ema:
            if ema is None:
                raise ConfigError(
                    "medcontext.reuse_validation_ema is true but the trainer has no validation EMA"
                )
            # The trainer already updates the validation EMA every step (and runs it at
            # `teacher_momentum` in this mode). MedContext must not update it a second time.
            self.teacher = unwrap_model(getattr(ema, "module", ema))
        else:
            self.teacher = copy.deepcopy(unwrap_model(model))
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.last_update_step = -1
        self.total_steps: int | None = None  # the run's planned optimiser steps (cosine schedule)

    def set_total_steps(self, total_steps: int) -> None:
        """The run's planned number of optimiser steps (the trainer's ``total_steps``, which an
        extended run re-plans, like the learning-rate schedule). The cosine momentum needs it."""
        self.total_steps = int(total_steps)

    def momentum_at(self, step: int) -> float:
        """Teacher EMA momentum after optimiser step ``step`` (0-based global step)."""
        if self.config.teacher_momentum_schedule == "constant":
            return teacher_momentum_at(step, self.config.teacher_momentum)
        if self.total_steps is None:
            raise ValueError("teacher_momentum_schedule 'cosine' needs the run length: call set_total_steps first")
        return cosine_momentum_at(step, self.config.teacher_momentum_start, self.config.teacher_momentum,
                                  self.total_steps)

    # ------------------------------------------------------------------------------ masking
    def _cell_mask(self, n_cells: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        total = math.prod(n_cells)
        # Round half up (not Python's banker's rounding) so ratio 0.5 of 5 cells hides 3.
        n_hidden = min(total, math.floor(self.config.mask_ratio * total + 0.5))
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(total, generator=generator, device=device)
        cells = torch.zeros(total, dtype=torch.bool, device=device)
        cells[order[:n_hidden]] = True
        return cells.view(n_cells)

    def mask(self, image: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Hide a random set of grid cells in each sample.

        Returns ``(masked_image, hidden)``. ``hidden`` is a ``(B, 1, *S)`` bool tensor, and
        ``masked_image`` equals ``mask_value`` on hidden voxels (all channels) and ``image``
        elsewhere. Each sample gets its own grid offset, uniform in ``[0, mask_patch)`` per
        axis, and its own cells. Cells cut by the patch border count as cells, so the expected
        hidden voxel fraction equals the hidden cell fraction. Random numbers come from
        ``generator`` (on its device), so a seeded generator reproduces the masks exactly.

        With ``mask_shape: tubes`` the cells are drawn on the grid of the leading axes only (x, y)
        and each hidden cell runs through the whole last axis (z), with no offset along it: the
        mask is constant along z and exactly ``round(ratio * n_xy_cells)`` x-y cells are hidden.
        """
        spatial = tuple(image.shape[2:])
        if len(spatial) != len(self.mask_patch):
            raise ValueError(
                f"image has {len(spatial)} spatial axes but medcontext.mask_patch has "
                f"{len(self.mask_patch)} entries"
            )
        gen_device = generator.device if generator is not None else torch.device("cpu")
        hidden = torch.empty((image.shape[0], 1, *spatial), dtype=torch.bool, device=image.device)
        tubes = self.config.mask_shape == "tubes"
        # A tube is one cell spanning the whole last axis, with no offset along it.
        patch = (*self.mask_patch[:-1], spatial[-1]) if tubes else self.mask_patch
        for b in range(image.shape[0]):
            offsets = [
                int(torch.randint(0, p, (1,), generator=generator, device=gen_device))
                for p in (patch[:-1] if tubes else patch)
            ] + ([0] if tubes else [])
            # Cell index of each voxel along each axis, with the grid shifted by the offset.
            index = [
                (torch.arange(size, device=image.device) + off) // p
                for size, off, p in zip(spatial, offsets, patch)
            ]
            n_cells = tuple(
                (size - 1 + off) // p + 1 for size, off, p in zip(spatial, offsets, patch)
            )
            voxels = self._cell_mask(n_cells, generator).to(image.device)
            # Expand cells to voxels one axis at a time: no full-size index grids in memory.
            for axis, ix in enumerate(index):
                voxels = voxels.index_select(axis, ix)
            hidden[b, 0] = voxels
        fill = torch.full((), self.config.mask_value, dtype=image.dtype, device=image.device)
        return torch.where(hidden, fill, image), hidden

    # ------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_probabilities(
        self, image: Tensor, task_ids: Tensor, modality_id: Tensor, task_mask: Tensor | None, **channels: Tensor
    ) -> Tensor:
        """The teacher's sigmoid probabilities ``(B, T, *S)`` in fp32 on the clean input.

        The teacher gets the same task and modality prompts (and ``channels``: the channel ids
        and mask of a ``channel_fusion: mean`` model) as the student, so their output channels
        line up one to one.
        """
        self.teacher.eval()  # a shared validation EMA may have been left in train mode
        logits = _logits_of(self.teacher(image, task_ids, modality_id, task_mask, **channels))
        return torch.sigmoid(logits.float())

    @torch.no_grad()
    def update_teacher(self, model: nn.Module, step: int) -> None:
        """EMA-update the teacher after optimiser step ``step`` (0-based global step).

        Parameters and floating-point buffers (e.g. BatchNorm running statistics) are averaged
        with the momentum of :meth:`momentum_at`. Integer buffers such as ``num_batches_tracked`` are
        copied. This does nothing when the teacher is the reused validation EMA, because the
        trainer's own EMA update has already moved it this step.
        """
        self.last_update_step = int(step)
        if self.reuses_ema:
            return
        momentum = self.momentum_at(int(step))
        student = unwrap_model(model)
        student_state = dict(student.named_parameters())
        student_state.update(student.named_buffers())
        averaged: list[Tensor] = []
        sources: list[Tensor] = []
        for name, value in [*self.teacher.named_parameters(), *self.teacher.named_buffers()]:
            if name not in student_state:
                raise ValueError(f"student has no tensor {name!r} that the teacher has")
            source = student_state[name].detach().to(value.device)
            if value.is_floating_point():
                averaged.append(value)
                sources.append(source.to(value.dtype))
            else:
                value.copy_(source)
        if averaged:
            # lerp: t + (1 - m) * (s - t) == m * t + (1 - m) * s, fused over all tensors.
            torch._foreach_lerp_(averaged, sources, 1.0 - momentum)

    # ------------------------------------------------------------------------------ losses
    @staticmethod
    def _ramp(step: int, rampup: int) -> float:
        return 1.0 if rampup <= 0 else min(1.0, max(0.0, step / rampup))

    def consistency_ramp(self, step: int) -> float:
        """Linear ramp from 0 at step 0 to 1 at ``consistency_rampup_steps`` (1 if unset)."""
        return self._ramp(step, self.config.consistency_rampup_steps)

    def masked_ramp(self, step: int) -> float:
        """Linear ramp of both terms from 0 at step 0 to 1 at ``masked_rampup_steps`` (1 if unset)."""
        return self._ramp(step, self.config.masked_rampup_steps)

    def _excluded_slots(self, task_ids: Tensor, task_mask: Tensor) -> Tensor | None:
        """``(B, T)`` bool: valid slots whose task is excluded from hidden voxels, or None."""
        if not self.excluded_task_ids:
            return None
        excluded = torch.tensor(self.excluded_task_ids, device=task_ids.device, dtype=task_ids.dtype)
        slots = torch.isin(task_ids, excluded) & task_mask
        return slots if bool(slots.any()) else None

    def loss(
        self,
        student_logits: Tensor,
        teacher_probs: Tensor,
        target: Tensor,
        task_ids: Tensor,
        task_mask: Tensor,
        hidden: Tensor,
        step: int,
        supervised_loss_fn: SupervisedLossFn,
        supervised: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The masked pass's losses: ``masked_supervised``, ``consistency`` and ``total``.

        ``total = masked_ramp(step) * (masked_supervision_weight * masked_supervised
        + beta * consistency_ramp(step) * consistency)``. ``beta`` is ``consistency_weight``,
        or with ``consistency_target_fraction`` f it is
        ``f * supervised / max(consistency, CONSISTENCY_FLOOR)`` on detached values: the weighted
        term equals f times the clean supervised loss (before the ramps), and its gradient
        reaches the masked-pass logits only. ``supervised`` (the clean pass's segmentation loss)
        is required then and unused otherwise. ``weight_masked_supervised`` and
        ``weight_consistency`` (0-d, no gradient) are the effective multipliers of the two raw
        terms at this step, ramps included.

        * ``masked_supervised``: the trainer's partial-label loss on the masked-input logits.
          For excluded tasks a voxel weight map zeroes the hidden voxels.
        * ``consistency``: ``mean((sigmoid(student) - teacher)^2)`` in fp32. It is averaged over
          voxels for each (sample, task) pair, then over the pairs where ``task_mask`` is
          True. Padded slots contribute nothing, and neither do tasks the sample is not
          annotated for. Excluded tasks average over unhidden voxels only. The result lies
          in [0, 1], the same order as BCE/Dice, so ``consistency_weight`` is meaningful.
        """
        task_mask = task_mask.to(torch.bool)
        excluded = self._excluded_slots(task_ids, task_mask)
        voxel_weight: Tensor | None = None
        if excluded is not None:
            view = excluded.view(*excluded.shape, *([1] * (student_logits.ndim - 2)))
            voxel_weight = (~(hidden & view)).to(torch.float32)  # (B, T, *S)

        masked_supervised = supervised_loss_fn(student_logits, target, task_mask, voxel_weight=voxel_weight)

        squared = (torch.sigmoid(student_logits.float()) - teacher_probs.detach().float()).square()
        spatial = tuple(range(2, squared.ndim))
        if voxel_weight is None:
            per_pair = squared.mean(dim=spatial)
            valid = task_mask
        else:
            weight_sum = voxel_weight.sum(dim=spatial)
            per_pair = (squared * voxel_weight).sum(dim=spatial) / weight_sum.clamp_min(1.0)
            valid = task_mask & (weight_sum > 0)
        valid_f = valid.to(per_pair.dtype)
        # Multiplying by the mask (not indexing) keeps a zero-valued graph when no slot is
        # valid, so backward still works on an all-padding batch.
        consistency = (per_pair * valid_f).sum() / valid_f.sum().clamp_min(1.0)

        ramp = self.masked_ramp(step)
        alpha = self.config.masked_supervision_weight * ramp
        fraction = self.config.consistency_target_fraction
        beta: Tensor | float
        if fraction is None:
            beta = self.config.consistency_weight * self.consistency_ramp(step) * ramp
        else:
            if supervised is None:
                raise ValueError("medcontext.consistency_target_fraction needs the clean supervised loss")
            scale = fraction * self.consistency_ramp(step) * ramp
            beta = scale * supervised.detach().float() / consistency.detach().clamp_min(CONSISTENCY_FLOOR)
        weighted_masked = alpha * masked_supervised
        weighted_consistency = beta * consistency
        return {"masked_supervised": masked_supervised, "consistency": consistency,
                "total": weighted_masked + weighted_consistency,
                "weighted_masked_supervised": weighted_masked, "weighted_consistency": weighted_consistency,
                "weight_masked_supervised": torch.as_tensor(alpha, dtype=torch.float32),
                "weight_consistency": torch.as_tensor(beta, dtype=torch.float32).detach()}

    # ------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Teacher weights and the step of the last update. A reused validation EMA is saved
        by the trainer, so it is not duplicated here."""
        state: dict[str, Any] = {
            "reuse_validation_ema": self.reuses_ema,
            "last_update_step": self.last_update_step,
        }
        if not self.reuses_ema:
            state["teacher"] = {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        reused = bool(state.get("reuse_validation_ema", False))
        if reused != self.reuses_ema:
            raise ModelError(
                "checkpoint MedContext state was saved with medcontext.reuse_validation_ema="
                f"{reused} but the config now says {self.reuses_ema}; resume with the same setting"
            )
        if not self.reuses_ema:
            if "teacher" not in state:
                raise ModelError("checkpoint MedContext state has no teacher weights")
            self.teacher.load_state_dict(state["teacher"], strict=True)
        self.last_update_step = int(state.get("last_update_step", -1))
