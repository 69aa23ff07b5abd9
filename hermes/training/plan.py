"""Everything a training run checks and builds before its first step.

All user errors are raised here, before any training: a missing catalog or cache, a dataset
name the catalog does not know, a catalog the cache was not prepared from, a patch the model
cannot process, an output folder that already holds another run. The model is also run once
(forward + backward on a zero patch) so that shape problems surface as a clear
:class:`ConfigError` and DDP learns whether any parameter goes unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hermes.bundle import ModelBundle, NetworkSpec, Preprocessing, TrainingRecord
from hermes.config import TrainConfig
from hermes.data.cache import CacheIndex, check_cached_cases, open_cache
from hermes.data.catalog import Catalog, load_catalog
from hermes.data.sampling import training_cases
from hermes.errors import ConfigError, DataError, HermesError
from hermes.models.architectures import patch_constraints
from hermes.models.channel_stem import channel_inputs
from hermes.models.registry import build_model
from hermes.runtime import AmpSettings
from hermes.training.checkpoint import checkpoint_path
from hermes.training.distributed import find_unused_parameters
from hermes.training.loss import HermesLoss


@dataclass
class RunData:
    catalog: Catalog
    cache: CacheIndex
    train_cases: dict[str, list[str]]
    val_cases: dict[str, list[str]]
    # Output tasks of a non-Hermes network: traditional, its dataset's tasks; universal, all.
    task_ids_of_model: list[int] | None


def check_output(output: Path, resume: bool) -> None:
    has_checkpoint = checkpoint_path(output).is_file()
    if resume and not has_checkpoint:
        raise ConfigError(f"--resume: no checkpoint in {output} (expected {checkpoint_path(output)})")
    if not resume and has_checkpoint:
        raise ConfigError(
            f"output {output} already holds a training run; use --resume to continue it or choose "
            "another --output"
        )


def load_data(config: TrainConfig) -> RunData:
    """Catalog, cache and the train/validation case split (traditional: one dataset)."""
    if not Path(config.catalog).is_file():
        raise ConfigError(f"catalog file not found: {config.catalog} (config key `catalog`)")
    catalog = load_catalog(config.catalog)
    if not (Path(config.cache) / "cache.json").is_file():
        raise ConfigError(
            f"cache not found: {config.cache} (config key `cache`); run "
            f"`hermes prepare {config.catalog} --out {config.cache}` first"
        )
    cache = open_cache(config.cache)
    cached = {entry.name: entry for entry in cache.catalog.datasets}
    for entry in catalog.datasets:
        if entry.test_only:
            continue
        if entry.name not in cached:
            raise DataError(
                f"dataset {entry.name!r} of {config.catalog} is not in the cache {config.cache}; "
                "run `hermes prepare` again with this catalog"
            )
        if list(cached[entry.name].channel_names) != list(entry.channel_names):
            raise DataError(f"dataset {entry.name!r}: channels differ between {config.catalog} and the cache")
    train, val = training_cases(cache, config.data, config.seed)
    names = {entry.name for entry in catalog.datasets if not entry.test_only}
    train = {name: ids for name, ids in train.items() if name in names and ids}
    val = {name: ids for name, ids in val.items() if name in names and ids}
    task_ids_of_model = None
    if config.paradigm == "traditional":
        entry = catalog.dataset(str(config.dataset))  # ConfigError listing the valid names
        if entry.name not in train:
            raise DataError(f"dataset {entry.name!r} has no training cases in the cache {config.cache}")
        train = {entry.name: train[entry.name]}
        val = {entry.name: val[entry.name]} if entry.name in val else {}
        task_ids_of_model = list(entry.task_ids)
    elif not config.model.architecture.startswith("hermes_"):
        # A universal model without priors (MultiTalent / CLIP-universal style): the same
        # backbone with one sigmoid output per task of the training datasets, trained with the
        # same partial-label loss and batches; separates "universal training" from "priors".
        task_ids_of_model = sorted({t for entry in catalog.datasets if entry.name in train for t in entry.task_ids})
    if not train:
        raise DataError(f"no training cases: the cache {config.cache} has none for the catalog's datasets")
    check_cached_cases(config.cache, {name: train.get(name, []) + val.get(name, []) for name in {*train, *val}})
    return RunData(catalog, cache, train, val, task_ids_of_model)


def check_patch(config: TrainConfig) -> None:
    """The patch against the architecture's own constraints (hermes/models/architectures.py)."""
    rules = patch_constraints(config.model)
    problems = rules.problems(config.data.patch_size)
    if problems:
        raise ConfigError(
            f"data.patch_size {config.data.patch_size}: {'; '.join(problems)} "
            f"({config.model.architecture}: {rules.why})"
        )


def check_channels(config: TrainConfig, data: RunData) -> None:
    """Every training dataset's channels against the model's first layer: a plain convolution
    (``channel_fusion: none``) reads exactly ``model.in_channels`` channels."""
    if config.model.channel_fusion == "mean":
        return
    entries = [data.catalog.dataset(name) for name in data.train_cases]
    counts = {entry.num_channels for entry in entries}
    detail = ", ".join(f"{e.name}: {e.num_channels} ({', '.join(e.channel_names)})" for e in entries)
    if len(counts) > 1:
        raise ConfigError(
            f"training datasets have different channel counts ({detail}); model.channel_fusion: none takes "
            "one fixed count: set model.channel_fusion: mean (one stem per channel, averaged over the channels "
            "present) to train them in one model"
        )
    if counts != {config.model.in_channels}:
        raise ConfigError(
            f"model.in_channels is {config.model.in_channels} but the training datasets have {detail} channels; "
            "set model.in_channels to match, or model.channel_fusion: mean"
        )


def build_checked_model(config: TrainConfig, data: RunData, device: torch.device, amp: AmpSettings) -> tuple[nn.Module, list[str]]:
    """Build the model on ``device`` and run one forward/backward on a zero patch.

    Returns the model and the names of parameters that received no gradient (DDP then needs
    ``find_unused_parameters``).
    """
    catalog = data.catalog
    check_channels(config, data)
    model = build_model(
        config.model,
        num_tasks=catalog.num_tasks,
        num_modalities=catalog.num_modalities,
        task_ids_of_model=data.task_ids_of_model,
        patch_size=config.data.patch_size,
    ).to(device)
    if amp.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    # the dataset with the most channels: a fusing stem then runs on several channels too
    entry = max((catalog.dataset(name) for name in data.train_cases), key=lambda e: e.num_channels)
    n_tasks = len(entry.task_ids)
    batch = {
        "image": torch.zeros(1, entry.num_channels, *config.data.patch_size, device=device),
        "target": torch.zeros(1, n_tasks, *config.data.patch_size, device=device),
        "task_ids": torch.tensor([entry.task_ids], device=device),
        "task_mask": torch.ones(1, n_tasks, dtype=torch.bool, device=device),
        "modality_id": torch.tensor([entry.modality_id], device=device),
        "channel_ids": torch.tensor([catalog.channel_modality_ids(entry)], device=device),
        "channel_mask": torch.ones(1, entry.num_channels, dtype=torch.bool, device=device),
    }
    try:
        with amp.autocast():
            out = model(
                batch["image"], batch["task_ids"], batch["modality_id"], batch["task_mask"],
                **channel_inputs(model, batch),
            )
            loss = HermesLoss(config.loss)(out, batch)["total"]
        loss.backward()
    except HermesError:
        raise
    except (RuntimeError, ValueError) as error:
        raise ConfigError(
            f"model {config.model.architecture}/{config.model.preset} cannot train on data.patch_size "
            f"{config.data.patch_size}: {error}"
        ) from None
    unused = find_unused_parameters(model)
    model.zero_grad(set_to_none=True)
    return model, unused


def model_bundle(
    config: TrainConfig,
    data: RunData,
    step: int,
    amp: AmpSettings,
    val_dice: dict[str, float],
    network: NetworkSpec,
    final_weights: str | None = None,
    dice_by_weights: dict[str, dict[str, float]] | None = None,
) -> ModelBundle:
    """The saved model's bundle: everything ``hermes predict`` needs besides the weights, i.e.
    tasks, modalities, datasets (prompts) and the preprocessing plans (per dataset, and per
    modality for images of an unseen dataset), with the network entry and the run's record."""
    catalog = data.catalog
    plans = {name: plan.to_dict() for name, plan in data.cache.plans.items() if name in data.train_cases}
    by_modality: dict[str, dict[str, Any]] = {}
    # Per modality, the plan of the dataset with the most training cases; single-channel plans
    # first (an image of an unseen dataset is one channel far more often than a full set).
    for name in sorted(data.train_cases, key=lambda n: (catalog.dataset(n).num_channels != 1, -len(data.train_cases[n]))):
        if name in plans:
            by_modality.setdefault(catalog.dataset(name).modality, plans[name])
    datasets = [entry.to_dict() for entry in catalog.datasets if entry.name in data.train_cases]
    for item in datasets:
        item.pop("path", None)  # machine-specific; the model must not depend on it

    def finite(dice: dict[str, float]) -> dict[str, float | None]:
        return {k: (None if math.isnan(v) else v) for k, v in dice.items()}

    return ModelBundle(
        paradigm=config.paradigm,
        dataset=config.dataset,
        task_names=catalog.task_names,
        modalities=catalog.modalities,
        unknown_modality_id=catalog.unknown_modality_id,
        null_task_id=catalog.null_task_id,
        datasets=datasets,
        preprocessing=Preprocessing(datasets=plans, modalities=by_modality),
        training=TrainingRecord(
            steps=step,
            seed=config.seed,
            precision=amp.name,
            validation_dice=finite(val_dice),
            # held-out cases per dataset (`hermes evaluate --split val`, postprocessing choice)
            validation_cases={name: list(ids) for name, ids in data.val_cases.items()},
            config=config.model_dump(mode="json"),
            final_weights=final_weights,
            validation_dice_by_weights=None
            if dice_by_weights is None
            else {name: finite(dice) for name, dice in dice_by_weights.items()},
        ),
        network=network,
    )
