"""Partial-label segmentation loss (BCE + soft Dice), modality loss and deep supervision.

Every sample is supervised **only on its own tasks**: the batch carries one output channel per
requested task (``task_ids``), padded to the largest task count of the batch; padded slots
(``task_mask`` False) are not "background", they are simply absent from the loss and get no
gradient. There is no cross-dataset marginal or exclusion term (as in the Hermes paper). The
same holds for a task the sample's case is not annotated for (hermes/data/annotation.py): the
batch's ``loss_mask`` (``task_mask`` minus those pairs) is the mask :class:`HermesLoss` uses.

Notation, for one valid (sample b, task t) pair with logits ``x``, probabilities
``p = sigmoid(x)``, binary target ``g`` and optional voxel weights ``w >= 0`` (all ones when no
weight map is given), sums over the voxels ``v`` of the patch:

* **BCE**: ``bce[b,t] = sum_v w_v * BCE(x_v, g_v) / sum_v w_v`` over the valid pairs (those
  with ``task_mask`` True and a non-zero weight sum).
* **Soft Dice**: ``dice[b,t] = 1 - (2 * sum_v w p g + s) / (sum_v w p + sum_v w g + s)`` with a
  tiny smoothing ``s`` (1e-5, nnU-Net's) that only guards the division, over the valid pairs
  **whose target is non-empty in the crop** (``sum_v w g > 0``).

Reduction over the batch (``reduction``):

* ``"sample"`` (default): the mean over each sample's own contributing tasks, then the mean over
  the samples that have any. Every sample weighs the same whatever its dataset's task count, so
  a dataset's share of the gradient follows its share of the batches. Measured on realmini
  (HeadNeckCT, 7 tasks + HippocampusMR, 2 tasks; docs/benchmarks.md): with ``"pair"`` the CT
  dataset with many tasks suppressed the MR one (hippocampus test Dice 0.06).
* ``"pair"``: the paper's / reference code's mean over every contributing (sample, task) pair of
  the batch, so a dataset with 7 tasks weighs 3.5x a dataset with 2 in every mixed batch.

Empty targets. A task absent from the crop (a small organ outside a 64^3 patch, a scan without
a lesion) is common in partially-labelled data. With a smoothed per-sample Dice such a channel
is ~1 for any non-trivial prediction and 0 only when the prediction vanishes: a step function
whose gradient (``s / (P + s)^2``) is ~0, which only dilutes the mean (the reference code's
"constant 1, zero gradient" has the same effect: with half the channels empty, present
structures get half the Dice gradient). We therefore exclude empty channels from the Dice mean
and let BCE, which penalises every false-positive voxel, supervise them. A channel with an
empty target can therefore never reward "predict nothing" on the channels that are present,
and the Dice value of a batch with no foreground at all is 0 (not NaN).

All arithmetic is done in float32, whatever the autocast dtype of the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from hermes.config import LossConfig

DICE_SMOOTH = 1e-5


def _sum_spatial(x: Tensor) -> Tensor:
    return x.flatten(2).sum(-1)


Reduction = Literal["sample", "pair"]


def _reduce(values: Tensor, contributing: Tensor, reduction: Reduction) -> Tensor:
    """Mean of ``values[b, t]`` over the contributing pairs, per ``reduction`` (module docstring).

    Non-contributing pairs are selected out (not multiplied by 0) so that they add exactly
    nothing, and an empty set gives 0 (graph-connected, so DDP still sees every parameter used).
    """
    selected = torch.where(contributing, values, 0.0)
    if reduction == "pair":
        return selected.sum() / contributing.sum().clamp_min(1)
    per_sample_count = contributing.sum(dim=1)
    per_sample = selected.sum(dim=1) / per_sample_count.clamp_min(1)
    has_any = per_sample_count > 0
    return torch.where(has_any, per_sample, 0.0).sum() / has_any.sum().clamp_min(1)


def partial_label_terms(
    logits: Tensor,
    target: Tensor,
    task_mask: Tensor,
    voxel_weight: Tensor | None = None,
    reduction: Reduction = "sample",
) -> tuple[Tensor, Tensor]:
    """Return the (BCE, Dice) scalars of the partial-label loss (see the module docstring).

    Args:
        logits: (B, T, *S) one sigmoid channel per requested task.
        target: (B, T, *S) binary float target, channel j is task ``task_ids[b, j]``.
        task_mask: (B, T) bool, False on padded slots.
        voxel_weight: optional non-negative weights broadcastable to (B, T, *S), e.g. (B, 1, *S)
            (MedContext zeroes the hidden voxels of excluded tasks).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    if task_mask.shape != logits.shape[:2]:
        raise ValueError(f"task_mask {tuple(task_mask.shape)} does not match logits {tuple(logits.shape[:2])}")
    x = logits.float()
    g = target.float()
    valid = task_mask.bool()
    bce_map = F.binary_cross_entropy_with_logits(x, g, reduction="none")
    p = torch.sigmoid(x)
    if voxel_weight is None:
        n_vox = float(x[0, 0].numel())
        bce_bt = _sum_spatial(bce_map) / n_vox
        inter = _sum_spatial(p * g)
        pred = _sum_spatial(p)
        ref = _sum_spatial(g)
    else:
        w = voxel_weight.float().expand_as(x)
        w_sum = _sum_spatial(w)
        valid = valid & (w_sum > 0)
        bce_bt = _sum_spatial(w * bce_map) / w_sum.clamp_min(1e-12)
        inter = _sum_spatial(w * p * g)
        pred = _sum_spatial(w * p)
        ref = _sum_spatial(w * g)
    dice_bt = 1.0 - (2.0 * inter + DICE_SMOOTH) / (pred + ref + DICE_SMOOTH)

    present = valid & (ref > 0)
    return _reduce(bce_bt, valid, reduction), _reduce(dice_bt, present, reduction)


class PartialLabelLoss:
    """``bce_weight * BCE + dice_weight * Dice`` over each sample's own tasks.

    Callable as ``loss(logits, target, task_mask, voxel_weight=None) -> scalar``: the signature
    MedContext expects of the supervised loss.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, reduction: Reduction = "sample") -> None:
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.reduction = reduction

    def terms(
        self, logits: Tensor, target: Tensor, task_mask: Tensor, voxel_weight: Tensor | None = None
    ) -> dict[str, Tensor]:
        bce, dice = partial_label_terms(logits, target, task_mask, voxel_weight, self.reduction)
        return {"bce": bce, "dice": dice, "seg": self.bce_weight * bce + self.dice_weight * dice}

    def __call__(
        self, logits: Tensor, target: Tensor, task_mask: Tensor, voxel_weight: Tensor | None = None
    ) -> Tensor:
        return self.terms(logits, target, task_mask, voxel_weight)["seg"]


def modality_loss(modality_logits: Tensor, modality_id: Tensor) -> Tensor:
    """Cross-entropy of the modality head; the unknown modality (id ``M`` = number of logits) is ignored.

    Returns 0 (graph-connected) when every sample of the batch has the unknown modality, where
    ``F.cross_entropy`` would return NaN.
    """
    num_modalities = modality_logits.shape[1]
    known = modality_id < num_modalities
    if not bool(known.any()):
        return modality_logits.float().sum() * 0.0
    return F.cross_entropy(modality_logits.float()[known], modality_id[known])


def downsample_target(target: Tensor, size: Sequence[int]) -> Tensor:
    """Binary target at a lower resolution: max-pooling keeps thin structures (a voxel is
    foreground if any voxel it covers is), unlike nearest-neighbour which can drop them."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    return F.adaptive_max_pool3d(target.float(), tuple(size))


def downsample_weight(weight: Tensor, size: Sequence[int]) -> Tensor:
    """Voxel weights at a lower resolution: the mean weight of the covered voxels."""
    if tuple(weight.shape[2:]) == tuple(size):
        return weight
    return F.adaptive_avg_pool3d(weight.float(), tuple(size))


def deep_supervision_weights(levels: int, configured: Sequence[float] | None) -> list[float]:
    """Weights of [main, level 1, level 2, ...]; None: halve per level, normalised to sum 1
    (nnU-Net's choice, so that the loss scale does not grow with the number of levels)."""
    if configured is not None:
        if len(configured) != levels:
            raise ValueError(
                f"loss.deep_supervision_weights has {len(configured)} entries but the model "
                f"returns {levels} outputs (main + deep-supervision levels)"
            )
        return [float(v) for v in configured]
    raw = [0.5**i for i in range(levels)]
    total = sum(raw)
    return [v / total for v in raw]


class _Output(Protocol):
    logits: Tensor
    modality_logits: Tensor | None
    deep_supervision: list[Tensor]


class HermesLoss:
    """The training objective: partial-label segmentation loss (with optional deep supervision)
    plus ``modality_weight`` x modality cross-entropy.

    ``__call__(output, batch, voxel_weight=None)`` returns a dict of scalars: ``bce``, ``dice``,
    ``seg`` (the deep-supervision-weighted segmentation loss), ``modality`` and ``total``.
    """

    def __init__(self, config: LossConfig) -> None:
        self.config = config
        self.segmentation = PartialLabelLoss(config.bce_weight, config.dice_weight, config.reduction)

    def __call__(
        self, output: _Output, batch: dict[str, Any], voxel_weight: Tensor | None = None
    ) -> dict[str, Tensor]:
        target = batch["target"]
        task_mask = batch.get("loss_mask", batch["task_mask"])  # unannotated pairs: no loss
        terms = self.segmentation.terms(output.logits, target, task_mask, voxel_weight)
        deep = sorted(output.deep_supervision or [], key=lambda t: -t[0, 0].numel())
        if deep:
            weights = deep_supervision_weights(1 + len(deep), self.config.deep_supervision_weights)
            seg = weights[0] * terms["seg"]
            for w, logits in zip(weights[1:], deep, strict=True):
                size = logits.shape[2:]
                vw = None if voxel_weight is None else downsample_weight(voxel_weight, size)
                seg = seg + w * self.segmentation(logits, downsample_target(target, size), task_mask, vw)
            terms["seg"] = seg
        if output.modality_logits is not None and self.config.modality_weight > 0:
            terms["modality"] = modality_loss(output.modality_logits, batch["modality_id"])
        else:
            terms["modality"] = terms["seg"].new_zeros(())
        terms["total"] = terms["seg"] + self.config.modality_weight * terms["modality"]
        return terms
