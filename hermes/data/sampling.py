"""Mixed-dataset patch sampling from the cache, one reproducible batch per index.

Every batch is a pure function of ``(seed, rank, batch_index)``: its random generator is
seeded from those three numbers. Hence

* DataLoader workers need no RNG seeding of their own (worker ``w`` computes batches
  ``w, w + n, ...`` and the loader returns them in order);
* DDP ranks draw different samples (the rank is part of the seed) without a shared sampler;
* resuming at step ``s`` is ``start_step=s``: the same batches as an uninterrupted run, with
  no sampler state to save.

A batch follows the contract of docs/architecture.md: each sample is supervised only on its
own dataset's tasks (binary target channels built from the stored label values through the
catalog's label -> task mapping), the task list is padded per batch with the null task id and
``task_mask`` marks the real slots. ``loss_mask`` is ``task_mask`` minus the tasks the case is
not annotated for (hermes/data/annotation.py): those stay in the prompt, out of the loss.

Channels: datasets may have different channel counts (a 4-sequence brain MR next to 1-channel
CT). The image is padded to the batch's largest count with zero channels; ``channel_mask``
marks the real ones and ``channel_ids`` gives each channel's modality id (the catalog's
``channel_modalities``). Channel dropout (``data.channel_dropout``) then masks some channels
of multi-channel samples, never all of a sample's.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hermes.config import DataConfig, ModelConfig
from hermes.data.annotation import cached_task_annotation
from hermes.data.augment import augment_patch
from hermes.data.cache import CachedCase, CacheIndex, load_cached_case
from hermes.data.catalog import Catalog, DatasetEntry
from hermes.errors import ConfigError, DataError


# --------------------------------------------------------------------------------------------
# Splits and weights
# --------------------------------------------------------------------------------------------
def split_cases(
    cases: Mapping[str, Sequence[str]], val_fraction: float, val_min_cases: int, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Hold out ``max(val_min_cases, round(val_fraction * n))`` training cases per dataset.

    Deterministic in ``seed`` and independent of dataset order: each dataset is shuffled with
    a generator seeded by (seed, crc32(dataset name)) from its sorted case list. At least one
    case always stays for training (a one-case dataset gives no validation case).
    """
    train: dict[str, list[str]] = {}
    val: dict[str, list[str]] = {}
    for dataset, ids in cases.items():
        ordered = sorted(ids)
        n = len(ordered)
        n_val = 0 if n <= 1 or val_fraction <= 0 else min(n - 1, max(val_min_cases, round(val_fraction * n)))
        rng = np.random.default_rng([seed, zlib.crc32(dataset.encode())])
        perm = rng.permutation(n)
        held = {ordered[i] for i in perm[:n_val]}
        val[dataset] = [c for c in ordered if c in held]
        train[dataset] = [c for c in ordered if c not in held]
    return train, val


def dataset_probabilities(
    train_cases: Mapping[str, Sequence[str]], power: float, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Sampling probability per dataset: ``n_cases ** power`` unless overridden, normalised.

    Weights are per *dataset* (unlike the reference code's per-case weights, whose batch
    shares are hard to read off the config): power 0 is uniform over datasets, 1 uniform over
    cases, 0.5 in between.
    """
    weights: dict[str, float] = {}
    for dataset, ids in train_cases.items():
        if ids:
            weights[dataset] = float(len(ids)) ** power
    for dataset, weight in (overrides or {}).items():
        if dataset not in train_cases:
            raise ConfigError(
                f"data.dataset_weights: unknown dataset {dataset!r}; training datasets: {', '.join(train_cases)}"
            )
        if weight < 0:
            raise ConfigError(f"data.dataset_weights.{dataset}: weight must be >= 0, got {weight}")
        if dataset in weights:
            weights[dataset] = float(weight)
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError("no dataset to sample from: every training dataset is empty or has weight 0")
    return {dataset: weight / total for dataset, weight in weights.items() if weight > 0}


# --------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------
def random_center(rng: np.random.Generator, shape: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """A centre keeping the patch inside the volume where it fits (centred where it does not).

    Centres are in voxel coordinates; a patch of size p centred at ``start + (p - 1) / 2``
    covers exactly voxels ``start .. start + p - 1``.
    """
    center = []
    for n, p in zip(shape, patch_size):
        start = int(rng.integers(0, n - p + 1)) if n > p else 0
        center.append(start + (p - 1) / 2.0 if n > p else (n - 1) / 2.0)
    return np.asarray(center)


def task_targets(label: torch.Tensor, entry: DatasetEntry) -> torch.Tensor:
    """``(T_i, *patch)`` float32 binary targets of a dataset's own tasks from label values."""
    target = torch.zeros((len(entry.label_values), *label.shape), dtype=torch.float32)
    for channel, values in enumerate(entry.label_values):
        for value in values:  # equality per value: several times faster than torch.isin here
            target[channel] += label == value
    return target


class PatchSampler:
    """Draws augmented patches of the catalog's training datasets from a cache."""

    def __init__(
        self,
        catalog: Catalog,
        cache_dir: str,
        config: DataConfig,
        train_cases: Mapping[str, Sequence[str]],
        seed: int,
        rank: int = 0,
    ) -> None:
        self.catalog = catalog
        self.cache_dir = cache_dir
        self.config = config
        self.seed = int(seed)
        self.rank = int(rank)
        self.entries = {entry.name: entry for entry in catalog.datasets}
        self.dataset_ids = {entry.name: i for i, entry in enumerate(catalog.datasets)}
        for name in train_cases:
            if name not in self.entries:
                raise ConfigError(f"dataset {name!r} is in the case list but not in the catalog")
        self.cases = {name: sorted(ids) for name, ids in train_cases.items() if ids and not self.entries[name].test_only}
        self.probabilities = dataset_probabilities(self.cases, config.sampling_power, config.dataset_weights)
        self.names = sorted(self.probabilities)
        self.p = np.array([self.probabilities[n] for n in self.names])
        self.p = self.p / self.p.sum()
        if not 0.0 <= config.foreground_fraction <= 1.0:
            raise ConfigError(f"data.foreground_fraction must be in [0, 1], got {config.foreground_fraction}")
        self._open: dict[tuple[str, str], CachedCase] = {}
        self._task_pool: list[tuple[str, int, list[str]]] | None = None

    def case(self, dataset: str, case_id: str) -> CachedCase:
        key = (dataset, case_id)
        if key not in self._open:  # memory maps are cheap; keep them per process
            self._open[key] = load_cached_case(self.cache_dir, dataset, case_id)
        return self._open[key]

    def task_pool(self) -> list[tuple[str, int, list[str]]]:
        """(dataset, channel, cases where that task is annotated and present) for every task of
        the sampled datasets that has any foreground: the population of task-first sampling.
        Built on first use from the cached ``labels_present`` (per process, like the memory maps)."""
        if self._task_pool is None:
            pool = []
            for name in self.names:
                entry = self.entries[name]
                metas = {case_id: self.case(name, case_id).meta for case_id in self.cases[name]}
                presence = {c: meta.get("labels_present") or {} for c, meta in metas.items()}
                annotated = {c: cached_task_annotation(meta, entry) for c, meta in metas.items()}
                for channel, values in enumerate(entry.label_values):
                    ids = [
                        c for c, present in presence.items()
                        if annotated[c][channel] and any(str(v) in present for v in values)
                    ]
                    if ids:
                        pool.append((name, channel, ids))
            self._task_pool = pool
        return self._task_pool

    def task_first(self, rng: np.random.Generator) -> tuple[str, str, np.ndarray | None]:
        """Task-balanced draw: a task uniformly over all tasks, a case containing it, and a
        voxel of it (None when the case's stored foreground sample has none of its voxels)."""
        pool = self.task_pool()
        dataset, channel, ids = pool[int(rng.integers(len(pool)))]
        case_id = ids[int(rng.integers(len(ids)))]
        foreground = self.case(dataset, case_id).foreground()
        values = [v for v in self.entries[dataset].label_values[channel] if len(foreground.get(v, ()))]
        if not values:
            return dataset, case_id, None
        coords = foreground[values[int(rng.integers(len(values)))]]
        return dataset, case_id, coords[int(rng.integers(len(coords)))].astype(np.float64)

    def choose_center(
        self, rng: np.random.Generator, case: CachedCase, entry: DatasetEntry, annotated: Sequence[bool] | None = None
    ) -> np.ndarray:
        """Foreground-oversampled centre: a voxel of a random present class of an annotated
        task (``annotated``: per own task, None = all), or anywhere."""
        shape = case.image.shape[1:]
        force_fg = rng.random() < self.config.foreground_fraction
        if force_fg and case.label is not None:
            keep = list(annotated) if annotated is not None else [True] * len(entry.label_values)
            wanted = {v for values, ok in zip(entry.label_values, keep) if ok for v in values}
            foreground = case.foreground()
            present = sorted(v for v in foreground if v in wanted and len(foreground[v]))
            if present:
                value = present[int(rng.integers(len(present)))]
                coords = foreground[value]
                return coords[int(rng.integers(len(coords)))].astype(np.float64)
        return random_center(rng, shape, self.config.patch_size)

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        center: np.ndarray | None = None
        if self.config.task_balance > 0 and rng.random() < self.config.task_balance and self.task_pool():
            dataset, case_id, center = self.task_first(rng)
        else:
            dataset = self.names[int(rng.choice(len(self.names), p=self.p))]
            ids = self.cases[dataset]
            case_id = ids[int(rng.integers(len(ids)))]
        entry = self.entries[dataset]
        case = self.case(dataset, case_id)
        if case.label is None:
            raise DataError(f"{case.path}: training case without label.npy; re-run `hermes prepare`")
        annotated = cached_task_annotation(case.meta, entry)
        if center is None:
            center = self.choose_center(rng, case, entry, annotated)
        image, label = augment_patch(
            rng,
            self.config.augment,
            entry.family,
            case.image,
            case.label,
            center,
            self.config.patch_size,
            case.meta.get("pad_value", 0.0),
        )
        assert label is not None
        return {
            "image": image,
            "target": task_targets(label, entry),
            "task_ids": torch.as_tensor(entry.task_ids, dtype=torch.int64),
            "annotated": torch.as_tensor(annotated, dtype=torch.bool),
            "modality_id": entry.modality_id,
            "channel_ids": torch.as_tensor(self.catalog.channel_modality_ids(entry), dtype=torch.int64),
            "dataset_id": self.dataset_ids[dataset],
            "case_id": case_id,
        }

    def batch_rng(self, batch_index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, int(batch_index)])

    def batch(self, batch_index: int) -> dict[str, Any]:
        """The batch number ``batch_index`` of this (seed, rank): a pure function of the three."""
        rng = self.batch_rng(batch_index)
        samples = [self.sample(rng) for _ in range(self.config.batch_size)]
        batch = collate_batch(samples, self.catalog.null_task_id)
        # drawn after the samples, so that the patches do not depend on the dropout rate
        batch["modality_prompt_id"] = modality_prompt(
            rng, batch["modality_id"], self.config.modality_dropout, self.catalog.unknown_modality_id
        )
        batch["channel_mask"] = drop_channels(rng, batch["channel_mask"], self.config.channel_dropout)
        return batch


def modality_prompt(rng: np.random.Generator, modality_id: torch.Tensor, rate: float, unknown_id: int) -> torch.Tensor:
    """The modality ids of the model's prompt: each replaced by ``unknown_id`` with probability
    ``rate`` (modality-prompt dropout, ``data.modality_dropout``), so that the unknown-modality
    path used by ``hermes predict`` without ``--modality`` is trained. ``modality_id`` itself
    (the modality loss's target) is left unchanged."""
    drop = torch.as_tensor(rng.random(len(modality_id)) < rate)
    return torch.where(drop, torch.full_like(modality_id, int(unknown_id)), modality_id)


def drop_channels(rng: np.random.Generator, channel_mask: torch.Tensor, rate: float) -> torch.Tensor:
    """``channel_mask`` with each present channel of a multi-channel sample masked with
    probability ``rate`` (``data.channel_dropout``); a sample whose every channel is drawn keeps
    one of them, chosen uniformly. Single-channel samples are never touched. ``rate`` 0 draws
    nothing (the batch's random stream is then what it was before channel dropout existed)."""
    if rate <= 0:
        return channel_mask
    drawn = torch.as_tensor(rng.random(tuple(channel_mask.shape)) < rate)
    eligible = channel_mask.sum(dim=1, keepdim=True) > 1
    kept = channel_mask & ~(drawn & eligible)
    for b in torch.nonzero(~kept.any(dim=1) & channel_mask.any(dim=1)).flatten().tolist():
        present = torch.nonzero(channel_mask[b]).flatten()
        kept[b, present[int(rng.integers(len(present)))]] = True
    return kept


def collate_batch(samples: Sequence[Mapping[str, Any]], null_task_id: int) -> dict[str, Any]:
    """Stack samples, padding each task list to the batch maximum with the null task.

    ``loss_mask`` = ``task_mask`` and the sample's ``annotated`` flags (all True if absent).
    The model's prompt reads ``task_mask`` (an unannotated task is still context); the loss
    reads ``loss_mask`` (it gets no loss and no gradient, like a padded slot).

    Images with fewer channels than the batch's largest are padded with zero channels, masked
    in ``channel_mask``; ``channel_ids`` is each channel's modality id (the sample's
    ``channel_ids``, default its ``modality_id`` for every channel; padded slots repeat the
    sample's modality id, a valid id that no model reads)."""
    n_tasks = max(len(s["task_ids"]) for s in samples)
    n_channels = max(int(s["image"].shape[0]) for s in samples)
    patch = tuple(samples[0]["image"].shape[1:])
    batch = len(samples)
    image = torch.zeros((batch, n_channels, *patch), dtype=torch.float32)
    channel_ids = torch.zeros((batch, n_channels), dtype=torch.int64)
    channel_mask = torch.zeros((batch, n_channels), dtype=torch.bool)
    target = torch.zeros((batch, n_tasks, *patch), dtype=torch.float32)
    task_ids = torch.full((batch, n_tasks), int(null_task_id), dtype=torch.int64)
    task_mask = torch.zeros((batch, n_tasks), dtype=torch.bool)
    loss_mask = torch.zeros((batch, n_tasks), dtype=torch.bool)
    for b, sample in enumerate(samples):
        k = len(sample["task_ids"])
        target[b, :k] = sample["target"]
        task_ids[b, :k] = sample["task_ids"]
        task_mask[b, :k] = True
        loss_mask[b, :k] = torch.as_tensor(sample["annotated"], dtype=torch.bool) if "annotated" in sample else True
        c = int(sample["image"].shape[0])
        image[b, :c] = torch.as_tensor(sample["image"])
        channel_ids[b] = int(sample["modality_id"])
        if "channel_ids" in sample:
            channel_ids[b, :c] = torch.as_tensor(sample["channel_ids"], dtype=torch.int64)
        channel_mask[b, :c] = True
    return {
        "image": image,
        "target": target,
        "task_ids": task_ids,
        "task_mask": task_mask,
        "loss_mask": loss_mask,
        "modality_id": torch.as_tensor([int(s["modality_id"]) for s in samples], dtype=torch.int64),
        "channel_ids": channel_ids,
        "channel_mask": channel_mask,
        "dataset_id": torch.as_tensor([int(s["dataset_id"]) for s in samples], dtype=torch.int64),
        "case_id": [str(s["case_id"]) for s in samples],
    }


def model_data_config(data: DataConfig, model: ModelConfig) -> DataConfig:
    """The data settings a model trains with: ``channel_dropout`` acts only where the model can
    take a missing channel (``model.channel_fusion: mean``), so it is 0 for a plain first
    convolution (hermes/config.py says so next to the knob)."""
    if model.channel_fusion == "mean" or data.channel_dropout == 0:
        return data
    return data.model_copy(update={"channel_dropout": 0.0})


def training_cases(index: CacheIndex, config: DataConfig, seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The (train, validation) case split of a cache's training datasets."""
    return split_cases(index.train_cases(), config.val_fraction, config.val_min_cases, seed)
