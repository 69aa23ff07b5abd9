"""``make_train_loader``: the infinite, reproducible, resumable stream of training batches.

Batch ``b`` is computed from ``(seed, rank, b)`` only (see sampling.py), so the stream can be
split over DataLoader workers by batch index, sharded over DDP ranks by seeding with the
rank, and resumed exactly from any step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hermes.config import DataConfig
from hermes.data.cache import CachedCase, load_cached_case, open_cache
from hermes.data.catalog import Catalog
from hermes.data.sampling import PatchSampler, collate_batch, split_cases, training_cases
from hermes.errors import ConfigError, DataError

__all__ = [
    "BatchStream",
    "CachedCase",
    "collate_batch",
    "load_cached_case",
    "make_train_loader",
    "split_cases",
    "training_cases",
]


class BatchStream(IterableDataset):
    """Batches ``start_step, start_step + 1, ...``; worker ``w`` of ``n`` makes every n-th.

    ``torch.utils.data.DataLoader`` (``batch_size=None``) collects worker outputs round-robin
    in worker order, so the loader yields the batches in index order.
    """

    def __init__(self, sampler: PatchSampler, start_step: int = 0, num_batches: int | None = None) -> None:
        super().__init__()
        self.sampler = sampler
        self.start_step = int(start_step)
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stop = None if self.num_batches is None else self.start_step + self.num_batches
        for index in itertools.count(self.start_step + worker, workers):
            if stop is not None and index >= stop:
                return
            yield self.sampler.batch(index)


def _worker_init(_worker_id: int) -> None:
    # Each worker builds whole batches; intra-op threads would fight over the same cores.
    torch.set_num_threads(1)


def make_train_loader(
    catalog: Catalog,
    cache_dir: str | Path,
    data_config: DataConfig,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    cases: Mapping[str, Sequence[str]] | None = None,
    num_batches: int | None = None,
) -> DataLoader:
    """Training batches (docs/architecture.md "Batches") from a prepared cache.

    ``cases``: training cases per dataset; default, the cache's training cases minus the
    validation hold-out of :func:`split_cases` (``data_config.val_fraction``, ``seed``).
    Task ids come from ``catalog`` (label values in the cache are the original ones, so a
    catalog that only regroups tasks needs no new ``hermes prepare``). The stream is infinite
    unless ``num_batches`` is given.
    """
    if not 0 <= rank < max(world_size, 1):
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    index = open_cache(cache_dir)
    cached = {entry.name for entry in index.catalog.datasets}
    missing = [entry.name for entry in catalog.datasets if not entry.test_only and entry.name not in cached]
    if missing:
        raise DataError(f"{cache_dir}: datasets {', '.join(missing)} are not in the cache; run `hermes prepare` again")
    if cases is None:
        cases, _ = training_cases(index, data_config, seed)
        cases = {name: ids for name, ids in cases.items() if name in {e.name for e in catalog.datasets}}
    sampler = PatchSampler(catalog, str(cache_dir), data_config, cases, seed=seed, rank=rank)
    workers = data_config.num_workers
    return DataLoader(
        BatchStream(sampler, start_step, num_batches),
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
