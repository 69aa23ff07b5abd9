"""Mirroring test-time augmentation that respects left and right.

Averaging a network's output over mirrored copies of the input (nnU-Net's TTA) is valid only
if the network's answer is unchanged by the mirror. Hermes trains without mirroring by default
(``data.augment.mirror_axes: []``) because left and right organs are separate tasks: mirrored
left-right, a left kidney looks like a right kidney, so plain mirroring averages each with its
opposite (measured on the demo model: AbdomenCT mean Dice 0.924 -> 0.451). The rule here:

* an axis that training mirrored (the model's training config ``data.augment.mirror_axes``,
  in every training stage: base training and each adaptation) is mirrored as trained;
* the left-right axis (axis 0 of the canonical RAS arrays) is also mirrored when every dataset
  behind the prompted tasks declares its symmetry in the catalog (``mirror_pairs``): the
  output channels of each ``[left, right]`` pair are swapped after the mirror, so the left
  mask is still estimated from left-looking anatomy;
* otherwise ``--tta`` is refused (:class:`~hermes.errors.ConfigError` saying why), never run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hermes.bundle import AdaptationRecord, TrainingRecord
from hermes.data.catalog import Catalog, DatasetEntry
from hermes.errors import ConfigError
from hermes.inference.sliding_window import mirror_combinations

LEFT_RIGHT_AXIS = 0  # canonical RAS: axis 0 runs right -> left
Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MirrorPlan:
    """Which axes one sliding-window pass mirrors, and the task pairs a left-right mirror swaps."""

    trained_axes: tuple[int, ...]  # mirrored as training did (no channel swap)
    swap_axis: int | None = None  # mirrored with ``pairs`` swapped (never also in trained_axes)
    pairs: tuple[tuple[int, int], ...] = ()  # task ids

    @property
    def axes(self) -> tuple[int, ...]:
        extra = () if self.swap_axis is None else (self.swap_axis,)
        return tuple(sorted({*self.trained_axes, *extra}))

    def partner(self, task: int) -> int | None:
        for left, right in self.pairs:
            if task == left:
                return right
            if task == right:
                return left
        return None

    def extra_tasks(self, tasks: Sequence[int]) -> list[int]:
        """Partners of ``tasks`` the network must also output (a swap reads the partner's channel)."""
        if self.swap_axis is None:
            return []
        extra: list[int] = []
        for task in tasks:
            other = self.partner(task)
            if other is not None and other not in tasks and other not in extra:
                extra.append(other)
        return extra


def trained_mirror_axes(
    training: TrainingRecord | None, adaptation: Sequence[AdaptationRecord] = ()
) -> tuple[int, ...]:
    """Axes mirrored by every training stage of a saved model (its bundle's training record and
    adaptation records; none when a stage's config is not recorded: unknown means not mirrored)."""
    config = training.config if training is not None else None
    stages = [((config or {}).get("data") or {}).get("augment")]
    for record in adaptation:
        data = (record.config or {}).get("data")
        if data is not None:  # None: the adaptation kept the base model's data settings
            stages.append(data.get("augment"))
    axes: set[int] | None = None
    for augment in stages:
        if not isinstance(augment, dict) or not augment.get("enabled", True):
            return ()
        mirrored = {int(a) for a in augment.get("mirror_axes") or []}
        axes = mirrored if axes is None else axes & mirrored
    return tuple(sorted(axes or ()))


def _pairs(entries: Sequence[DatasetEntry]) -> tuple[tuple[int, int], ...] | None:
    """The union of the datasets' declared pairs; None if one of them declares no symmetry or
    two datasets pair one task differently."""
    pairs: dict[int, int] = {}
    for entry in entries:
        if entry.mirror_pairs is None:
            return None
        for left, right in entry.mirror_pairs:
            if pairs.get(left, right) != right or pairs.get(right, left) != left:
                return None
            pairs[left], pairs[right] = right, left
    return tuple(sorted({(min(a, b), max(a, b)) for a, b in pairs.items()}))


def refusal(trained_axes: Sequence[int], names: Sequence[str]) -> ConfigError:
    trained = (
        f"mirrored only axes {list(trained_axes)} in training" if trained_axes else "was trained without mirroring"
    )
    return ConfigError(
        f"--tta refused: the model {trained} (data.augment.mirror_axes) and dataset(s) {', '.join(names)} "
        "declare no left/right symmetry (catalog `mirror_pairs`); mirroring would average each left "
        "structure with its right counterpart. Train with data.augment.mirror_axes, or declare the "
        "datasets' mirror_pairs in the training catalog, or predict without --tta"
    )


def plan_mirroring(trained_axes: Sequence[int], entries: Sequence[DatasetEntry]) -> MirrorPlan:
    """The TTA of one prompt group whose tasks come from ``entries``; refuses when no axis is safe."""
    trained = tuple(sorted(int(a) for a in trained_axes))
    pairs = _pairs(entries) if entries else None
    if LEFT_RIGHT_AXIS not in trained and pairs is not None:
        return MirrorPlan(trained, LEFT_RIGHT_AXIS, pairs)
    if trained:
        return MirrorPlan(trained)
    raise refusal(trained, [e.name for e in entries] or ["(none)"])


def check_possible(trained_axes: Sequence[int], catalog: Catalog) -> None:
    """Fail before any work when no prompt of this model could be mirrored."""
    if not trained_axes and all(entry.mirror_pairs is None for entry in catalog.datasets):
        raise refusal(trained_axes, [e.name for e in catalog.datasets])


def mirrored_network(network: Network, plan: MirrorPlan, channel_tasks: Sequence[int], keep: int) -> Network:
    """``network`` averaged over every combination of ``plan.axes`` (2^k passes, logits averaged
    as nnU-Net does). ``channel_tasks``: task id of each output channel; a pass that mirrors the
    swap axis reads each paired task from its partner's channel. Returns the first ``keep``
    channels (partners added only for the swap are dropped)."""
    combos = mirror_combinations(plan.axes)
    tasks = list(channel_tasks)
    swap = [tasks.index(p) if (p := plan.partner(t)) is not None and p in tasks else i for i, t in enumerate(tasks)]
    missing = [tasks[i] for i in range(keep) if plan.swap_axis is not None and plan.partner(tasks[i]) is not None
               and plan.partner(tasks[i]) not in tasks]
    if missing:
        raise ValueError(f"mirrored_network: the partners of tasks {missing} are not among the output channels")

    def run(batch: torch.Tensor) -> torch.Tensor:
        total = network(batch)[:, :keep].float()
        for axes in combos:
            dims = [axis + 2 for axis in axes]
            out = torch.flip(network(torch.flip(batch, dims)), dims)
            if plan.swap_axis in axes:
                out = out[:, swap]
            total += out[:, :keep].float()
        return total / (len(combos) + 1)

    return run


__all__ = [
    "LEFT_RIGHT_AXIS",
    "MirrorPlan",
    "check_possible",
    "mirrored_network",
    "plan_mirroring",
    "refusal",
    "trained_mirror_axes",
]
