"""Per-task largest-connected-component postprocessing, decided on validation cases.

nnU-Net's rule: for each structure, keep only the largest connected component of the predicted
mask if, and only if, that raises the structure's mean Dice on the validation cases (a lone
organ gains from dropping stray islands; a structure that is legitimately several pieces, e.g.
lesions or both kidneys as one label, loses). ``hermes evaluate -m MODEL --split val
--choose-postprocessing`` measures both variants per task and stores the decision in
``MODEL/postprocessing.json``; ``hermes predict`` (and ``hermes evaluate``) apply it unless
``--no-postprocess``. Components are 26-connected (cc3d, C++: the field's library for this).

The step is applied to the final output, as nnU-Net does: the multi-label map (a voxel removed
from a task becomes background) or each binary mask, so the decision measured exactly what a
user gets.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import numpy as np

from hermes.bundle import postprocessing_path, read_postprocessing, write_postprocessing
from hermes.errors import DataError, ModelError


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (an empty mask stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    return cc3d.largest_k(mask, k=1, connectivity=26, binary_image=True) > 0


@dataclass
class Postprocessing:
    """Which tasks keep only their largest component, with the measurements behind it."""

    largest_component: tuple[str, ...] = ()
    # task -> {"dice_without", "dice_with", "cases", "keep"} (mean Dice over validation cases)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def apply_mask(self, task: str, mask: np.ndarray) -> np.ndarray:
        return largest_component(mask) if task in self.largest_component else mask

    def apply_labels(self, labels: np.ndarray, tasks: Sequence[str]) -> list[str]:
        """In place on a multi-label map (``i`` = ``tasks[i - 1]``); returns the tasks it touched."""
        applied = []
        for value, task in enumerate(tasks, start=1):
            if task in self.largest_component:
                mask = labels == value
                labels[mask & ~largest_component(mask)] = 0
                applied.append(task)
        return applied

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "hermes-postprocessing",
            "version": 1,
            "rule": "largest connected component (26-connected) kept for a task only where it raises the "
            "task's mean Dice on the validation cases",
            "largest_component": list(self.largest_component),
            "decisions": self.decisions,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Postprocessing:
        tasks = data["largest_component"]
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise TypeError("largest_component must be a list of task names")
        return cls(tuple(tasks), dict(data.get("decisions") or {}), dict(data.get("source") or {}))


def load_postprocessing(model_dir: str | Path, task_names: Sequence[str] | None = None) -> Postprocessing | None:
    """MODEL/postprocessing.json, or None when the model has none (nothing is applied)."""
    data = read_postprocessing(model_dir)
    if data is None:
        return None
    path = postprocessing_path(model_dir)
    try:
        plan = Postprocessing.from_dict(data)
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{path}: not a postprocessing file: {error}") from None
    unknown = [t for t in plan.largest_component if task_names is not None and t not in task_names]
    if unknown:
        raise ModelError(f"{path}: unknown task(s) {', '.join(unknown)} (not tasks of this model)")
    return plan


def save_postprocessing(model_dir: str | Path, plan: Postprocessing, overwrite: bool = False) -> Path:
    return write_postprocessing(model_dir, plan.to_dict(), overwrite)


def decide(scores: dict[str, list[tuple[float, float]]], source: dict[str, Any] | None = None) -> Postprocessing:
    """``scores[task]``: per validation case (Dice without, Dice with the largest component).
    A task keeps the step only if its mean Dice with it is strictly higher (cases where both
    masks are empty have NaN Dice and are left out of both means, as in the evaluation)."""
    keep: list[str] = []
    decisions: dict[str, dict[str, Any]] = {}
    for task, pairs in scores.items():
        without = [a for a, b in pairs if not (math.isnan(a) and math.isnan(b))]
        with_ = [b for a, b in pairs if not (math.isnan(a) and math.isnan(b))]
        mean_without = float(np.mean(without)) if without else math.nan
        mean_with = float(np.mean(with_)) if with_ else math.nan
        chosen = bool(without) and mean_with > mean_without
        decisions[task] = {
            "dice_without": None if math.isnan(mean_without) else mean_without,
            "dice_with": None if math.isnan(mean_with) else mean_with,
            "cases": len(without),
            "keep": chosen,
        }
        if chosen:
            keep.append(task)
    return Postprocessing(tuple(keep), decisions, dict(source or {}))


class Chooser:
    """Collects, per case and task, Dice of the raw mask and of its largest component
    (``evaluate_model(..., inspect=chooser)``), then :meth:`decide`."""

    def __init__(self) -> None:
        self.scores: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def __call__(self, dataset: str, case: str, masks: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> None:
        from hermes.evaluation.metrics import dice  # deferred: monai is not needed to predict

        for task, pred, ref in masks:
            self.scores[task].append((dice(pred, ref), dice(largest_component(pred), ref)))

    def decide(self, source: dict[str, Any] | None = None) -> Postprocessing:
        if not self.scores:
            raise DataError("no validation case was scored; nothing to decide the postprocessing on")
        return decide(dict(self.scores), source)


__all__ = [
    "Chooser",
    "Postprocessing",
    "decide",
    "largest_component",
    "load_postprocessing",
    "save_postprocessing",
]
