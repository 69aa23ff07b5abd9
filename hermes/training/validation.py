"""Periodic validation on held-out training cases: per-dataset Dice of the EMA model.

Each dataset's held-out cases (``data.val_fraction`` of its training split, chosen before
training starts) are segmented with the dataset's own task and modality prompts (the oracle
setting of the paper) either on the whole cached volume with the Gaussian sliding window of
:mod:`hermes.inference.sliding_window` (``validation.mode: full``) or on one central patch
(``patch``: much faster, noisier). Dice follows the evaluation conventions of
:mod:`hermes.evaluation.metrics`: a (case, task) pair where both masks are empty is skipped,
a false positive on a case without the structure scores 0, and a task the case is not
annotated for (meta.json ``annotated_labels``) is not scored. A dataset's score is the mean
over its tasks of the per-task mean over cases. The cache grid is used (no resampling back to the
original image): this is a training monitor, ``hermes evaluate`` gives the real numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hermes.config import ValidationConfig
from hermes.data.annotation import cached_task_annotation
from hermes.data.catalog import Catalog, DatasetEntry
from hermes.evaluation.metrics import dice
from hermes.inference.sliding_window import central_window, sliding_window_inference
from hermes.models.channel_stem import channel_inputs


def task_targets(label: np.ndarray, entry: DatasetEntry) -> np.ndarray:
    """(T_dataset, *S) bool: one mask per task of the dataset (union of its label values)."""
    return np.stack([np.isin(label, values) for values in entry.label_values])


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


class Validator:
    """Scores a model on fixed held-out cases; ``__call__(model) -> {dataset: Dice}``."""

    def __init__(
        self,
        catalog: Catalog,
        load_case: Callable[[str, str], Any],
        cases: Mapping[str, Sequence[str]],
        config: ValidationConfig,
        patch_size: Sequence[int],
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool = False,
    ) -> None:
        self.catalog = catalog
        self.load_case = load_case
        self.cases = {name: list(ids)[: config.max_cases_per_dataset] for name, ids in cases.items() if ids}
        self.config = config
        self.patch_size = [int(p) for p in patch_size]
        self.device = device
        self.precision = precision
        self.channels_last = channels_last

    @property
    def enabled(self) -> bool:
        return bool(self.cases)

    def _predict(
        self, model: nn.Module, image: torch.Tensor, entry: DatasetEntry, pad_value: Sequence[float] | float = 0.0
    ) -> torch.Tensor:
        task_ids = torch.tensor([entry.task_ids], dtype=torch.long, device=self.device)
        modality = torch.tensor([entry.modality_id], dtype=torch.long, device=self.device)
        channel_ids = torch.tensor([self.catalog.channel_modality_ids(entry)], dtype=torch.long, device=self.device)
        present = torch.ones_like(channel_ids, dtype=torch.bool)

        def network(window: torch.Tensor) -> torch.Tensor:
            n = window.shape[0]
            ids = task_ids.expand(n, -1)
            prompt = {"channel_ids": channel_ids.expand(n, -1), "channel_mask": present.expand(n, -1)}
            extra = channel_inputs(model, prompt)
            return model(window, ids, modality.expand(n), torch.ones_like(ids, dtype=torch.bool), **extra).logits

        return sliding_window_inference(
            image,
            network,
            self.patch_size,
            overlap=self.config.overlap,
            window_batch_size=1,
            device=self.device,
            precision=self.precision,  # type: ignore[arg-type]
            channels_last=self.channels_last,
            pad_value=pad_value,
        )

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        scores: dict[str, float] = {}
        try:
            for name, case_ids in self.cases.items():
                entry = self.catalog.dataset(name)
                per_task: list[list[float]] = [[] for _ in entry.task_ids]
                for case_id in case_ids:
                    case = self.load_case(name, case_id)
                    if case.label is None:
                        continue
                    image = torch.from_numpy(np.array(case.image, dtype=np.float32))[None]
                    ref = torch.from_numpy(task_targets(np.asarray(case.label), entry))[None].float()
                    pad_value = (getattr(case, "meta", None) or {}).get("pad_value", 0.0)
                    if self.config.mode == "patch":
                        image = central_window(image, self.patch_size, pad_value)
                        ref = central_window(ref, self.patch_size)
                    logits = self._predict(model, image, entry, pad_value)
                    pred = (logits > 0).cpu().numpy()
                    ref_np = ref[0].numpy() > 0.5
                    annotated = cached_task_annotation(getattr(case, "meta", None) or {}, entry)
                    for t in range(len(entry.task_ids)):
                        if annotated[t]:
                            per_task[t].append(dice(pred[t], ref_np[t]))
                scores[name] = _nanmean([_nanmean(values) for values in per_task])
        finally:
            model.train(was_training)
        return scores


def mean_dice(scores: Mapping[str, float]) -> float:
    return _nanmean(list(scores.values()))
