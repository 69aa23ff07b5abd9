"""The adaptation engine shared by `hermes finetune` and `hermes extend`.

1. load the base model and its catalog; merge the new catalog into it (old ids kept);
2. build the model for the merged catalog and warm-start it from the base (old rows exact);
3. optionally freeze the backbone;
4. train on the new datasets' cache (plus, for extend, rehearsal samples and a distillation
   term supplied by the caller) with the project's loss, optimiser, schedule and EMA;
5. save a normal model directory: the EMA weights, a bundle whose catalog is the merged one and
   whose preprocessing plans are the base model's plus the new datasets', and ``catalog.yaml``.

The loop is deliberately the trainer's recipe in miniature (same loss, LAMB/AdamW factory,
warm-up + decay, gradient clipping, EMA, AMP) rather than a hook into ``hermes train``: an
adaptation run needs two data sources, a second (frozen) model and a partly frozen network,
and no validation/checkpointing machinery for a few hundred steps.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hermes.adaptation.merge import MergedCatalog, merge_catalogs
from hermes.adaptation.warm_start import (
    WarmStartPlan,
    describe_plan,
    freeze_backbone,
    frozen_norm_modules,
    plan_warm_start,
    warm_start_state,
)
from hermes.bundle import SPEC_FILE, AdaptationRecord, ModelBundle, Preprocessing, catalog_path
from hermes.config import AdaptationConfig, DataConfig
from hermes.data.catalog import Catalog, load_catalog
from hermes.data.sampling import model_data_config
from hermes.errors import ConfigError, DataError, ModelError
from hermes.runtime import resolve_amp, to_device
from hermes.training.step import ExtraLoss, train_step

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------
@dataclass
class BaseModel:
    directory: Path
    model: nn.Module
    bundle: ModelBundle
    catalog: Catalog

    @property
    def is_universal(self) -> bool:
        return self.bundle.is_universal


def model_catalog(directory: Path, bundle: ModelBundle) -> Catalog:
    """The catalog a saved model was trained with, with its dataset folders when possible.

    The bundle's serialised catalog (adaptation output) first; else MODEL/catalog.yaml (``hermes
    train`` output; resolving it needs the dataset folders, which evaluating the old tasks
    needs anyway); else, when those folders are gone, the bundle's catalog summary (the old
    datasets can then be neither evaluated nor rehearsed from raw data).
    """
    from hermes.errors import HermesError
    from hermes.inference.predictor import model_catalog as bundle_catalog

    if bundle.catalog is not None:
        return Catalog.from_dict(bundle.catalog)
    path = catalog_path(directory)
    if path.is_file():
        try:
            catalog = load_catalog(path)
        except HermesError as error:
            log.warning("%s: %s; using the catalog summary of %s (no dataset folders)", path, error, SPEC_FILE)
        else:
            names = bundle.task_names
            if names is not None and list(names) != catalog.task_names:
                raise ModelError(
                    f"{path}: its tasks differ from {SPEC_FILE}'s task_names; the model directory is inconsistent"
                )
            return catalog
    return bundle_catalog(directory, bundle)


def load_base(directory: str | Path, device: torch.device | str = "cpu") -> BaseModel:
    from hermes.models.registry import load_model

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"base model directory not found: {directory}")
    model, bundle = load_model(directory, device=device)
    catalog = model_catalog(directory, bundle)
    if catalog.num_tasks != bundle.network.num_tasks:
        raise ModelError(
            f"{directory}: its catalog has {catalog.num_tasks} tasks but the model {bundle.network.num_tasks}"
        )
    return BaseModel(directory, model, bundle, catalog)


# --------------------------------------------------------------------------------------------
# Preparing the new model
# --------------------------------------------------------------------------------------------
@dataclass
class AdaptationSetup:
    base: BaseModel
    merged: MergedCatalog
    model: nn.Module
    plan: WarmStartPlan
    train_catalog: Catalog  # merged ids, only the datasets trained on
    frozen: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)

    @property
    def catalog(self) -> Catalog:
        return self.merged.catalog


def _subset_catalog(catalog: Catalog, names: list[str]) -> Catalog:
    wanted = set(names)
    return Catalog(
        tasks=catalog.tasks,
        vocabulary=catalog.vocabulary,
        datasets=[entry for entry in catalog.datasets if entry.name in wanted],
        preprocessing=catalog.preprocessing,
        source=None,
        spec=catalog.spec,
    )


def subset_catalog(catalog: Catalog, names: list[str]) -> Catalog:
    """The catalog with only ``names`` datasets (task/modality ids unchanged): a loader input."""
    return _subset_catalog(catalog, names)


def prepare(config: AdaptationConfig, device: torch.device | str = "cpu", base: BaseModel | None = None) -> AdaptationSetup:
    """Steps 1-3 of the module docstring."""
    from hermes.models.registry import build_model

    base = base or load_base(config.base_model, device)
    new_catalog = load_catalog(config.catalog)
    merged = merge_catalogs(base.catalog, new_catalog)
    catalog = merged.catalog

    train_names = list(config.datasets) if config.datasets else [
        entry.name for entry in new_catalog.datasets if not entry.test_only
    ]
    for name in train_names:
        if name not in merged.new_datasets:
            raise ConfigError(
                f"datasets: {name!r} is not a dataset of {config.catalog} (it has: {', '.join(merged.new_datasets)})"
            )
    if not train_names:
        raise ConfigError(f"{config.catalog}: no dataset to train on (all are test_only)")

    network = base.bundle.network
    model_config = network.config
    if model_config.channel_fusion == "none":
        wrong = [e for e in catalog.datasets if e.name in train_names and e.num_channels != model_config.in_channels]
        if wrong:
            raise ConfigError(
                f"the base model reads {model_config.in_channels} channel(s) through a plain first convolution "
                f"(model.channel_fusion: none); {', '.join(f'{e.name} has {e.num_channels}' for e in wrong)}"
            )
    own: list[int] | None = None
    if not base.is_universal:
        own = sorted({t for entry in catalog.datasets if entry.name in train_names for t in entry.task_ids})
    model = build_model(network.config, catalog.num_tasks, catalog.num_modalities, own, network.patch_size)

    plan = plan_warm_start(
        base.catalog.task_names, catalog.task_names, base.catalog.modalities, catalog.modalities, config.warm_start
    )
    old_state = {k: v.detach().cpu() for k, v in base.model.state_dict().items()}
    new_state = model.state_dict()
    state, reinit = warm_start_state(old_state, new_state, plan, reinit_mismatched=not base.is_universal)
    if not base.is_universal:
        old_own = [base.catalog.task_names[t] for t in network.task_ids_of_model or []]
        new_own = [catalog.task_names[t] for t in own or []]
        if old_own != new_own:
            # A per-dataset model's output channels are its own tasks: different tasks, new head.
            for key in list(state):
                if key.startswith(("network.head.", "network.deep_heads.")) and key not in reinit:
                    state[key] = new_state[key].clone()
                    reinit.append(key)
    model.load_state_dict(state, strict=True)
    for line in describe_plan(plan, catalog.task_names, catalog.modalities):
        log.info("warm start: %s", line)
    if reinit:
        log.info("re-initialised (task-specific output layers): %s", ", ".join(reinit))

    frozen: list[str] = []
    if config.freeze == "backbone":
        frozen = freeze_backbone(model)
    return AdaptationSetup(base, merged, model, plan, _subset_catalog(catalog, train_names), frozen, reinit)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def data_config_for(config: AdaptationConfig, base: BaseModel) -> DataConfig:
    """The adaptation run's data settings: the config's, else defaults at the model's patch size
    (channel dropout only for a model that takes missing channels: ``model_data_config``)."""
    model = base.bundle.network.config
    if config.data is not None:
        return model_data_config(config.data, model)
    try:
        return model_data_config(DataConfig(patch_size=base.bundle.patch_size), model)
    except ModelError:  # a model saved without a patch size: DataConfig's default
        return model_data_config(DataConfig(), model)


def choose_cases(
    available: dict[str, list[str]], names: list[str], limit: int | None, seed: int, what: str
) -> dict[str, list[str]]:
    """Training cases per dataset: all, or a seeded random subset of ``limit``."""
    out: dict[str, list[str]] = {}
    for name in names:
        ids = sorted(available.get(name, []))
        if not ids:
            raise DataError(f"{what}: dataset {name!r} has no cached training case (run `hermes prepare`)")
        if limit is not None and len(ids) > limit:
            rng = np.random.default_rng([seed, len(name), sum(map(ord, name))])
            ids = sorted(rng.choice(ids, size=limit, replace=False).tolist())
        out[name] = ids
    return out


def make_loader(
    catalog: Catalog, cache: Path, data: DataConfig, cases: dict[str, list[str]], seed: int
) -> Iterator[dict[str, Any]]:
    from hermes.data.loader import make_train_loader

    return iter(make_train_loader(catalog, cache, data, seed, cases=cases))


def concat_batches(a: dict[str, Any], b: dict[str, Any], null_task_id: int) -> dict[str, Any]:
    """One batch of the samples of two batches, task slots padded to the larger count."""
    t = max(a["task_ids"].shape[1], b["task_ids"].shape[1])

    def pad(batch: dict[str, Any]) -> dict[str, Any]:
        extra = t - batch["task_ids"].shape[1]
        if extra == 0:
            return batch
        n = batch["task_ids"].shape[0]
        target = batch["target"]
        return {
            **batch,
            "target": torch.cat([target, target.new_zeros((n, extra, *target.shape[2:]))], dim=1),
            "task_ids": torch.cat([batch["task_ids"], batch["task_ids"].new_full((n, extra), null_task_id)], dim=1),
            "task_mask": torch.cat([batch["task_mask"], batch["task_mask"].new_zeros((n, extra))], dim=1),
            **(
                {"loss_mask": torch.cat([batch["loss_mask"], batch["loss_mask"].new_zeros((n, extra))], dim=1)}
                if "loss_mask" in batch
                else {}
            ),
        }

    def pad_channels(batch: dict[str, Any], c: int) -> dict[str, Any]:
        """Zero image channels up to ``c``, masked (as collate_batch pads mixed channel counts)."""
        extra = c - batch["image"].shape[1]
        if extra == 0 or "channel_mask" not in batch:
            return batch
        n = batch["image"].shape[0]
        image = batch["image"]
        ids = batch["channel_ids"]
        return {
            **batch,
            "image": torch.cat([image, image.new_zeros((n, extra, *image.shape[2:]))], dim=1),
            "channel_ids": torch.cat([ids, batch["modality_id"].view(n, 1).expand(n, extra).to(ids.dtype)], dim=1),
            "channel_mask": torch.cat([batch["channel_mask"], batch["channel_mask"].new_zeros((n, extra))], dim=1),
        }

    c = max(a["image"].shape[1], b["image"].shape[1])
    a, b = pad_channels(pad(a), c), pad_channels(pad(b), c)
    out: dict[str, Any] = {}
    for key in a:
        if isinstance(a[key], Tensor):
            out[key] = torch.cat([a[key], b[key]], dim=0)
        else:
            out[key] = list(a[key]) + list(b[key])
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: nn.Module  # the EMA model (what is saved)
    history: list[dict[str, float]]
    seconds: float


def train(
    model: nn.Module,
    batches: Iterator[dict[str, Any]],
    config: AdaptationConfig,
    device: torch.device,
    frozen: list[str] | None = None,
    extra_batches: Iterator[dict[str, Any]] | None = None,
    extra_loss: ExtraLoss | None = None,
    null_task_id: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """``config.steps`` optimiser steps on ``batches`` (+ ``extra_batches`` appended to each)."""
    import time

    from hermes.training.ema import ModelEMA
    from hermes.training.loss import HermesLoss
    from hermes.training.optim import build_optimizer, build_scheduler

    torch.manual_seed(config.seed)
    amp = resolve_amp(config.precision, "auto", device)
    model = model.to(device)
    if amp.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: every parameter is frozen")
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.steps)
    scaler = amp.make_scaler()
    ema = ModelEMA(model, config.ema_decay)
    loss_fn = HermesLoss(config.loss)
    keep_eval = frozen_norm_modules(model, frozen or [])
    if extra_batches is not None and null_task_id is None:
        raise ValueError("extra_batches needs null_task_id")

    history: list[dict[str, float]] = []
    running: dict[str, float] = {}
    start = time.perf_counter()
    model.train()
    for module in keep_eval:
        module.eval()
    bar = tqdm(range(config.steps), desc="adapt", unit="step", disable=not progress)
    for step in bar:
        batch = next(batches)
        if extra_batches is not None:
            batch = concat_batches(batch, next(extra_batches), int(null_task_id))  # type: ignore[arg-type]
        batch = to_device(batch, device, amp.channels_last)
        # Adaptation prompts with each case's own modality (no modality-prompt dropout): the
        # new datasets' modalities are known, and the base model's recognition is left as is.
        batch.pop("modality_prompt_id", None)
        terms = train_step(model, batch, loss_fn, optimizer, amp, scaler, config.optim.grad_clip, step=step,
                           extra_loss=extra_loss)
        if not math.isfinite(terms["loss"]):
            raise ModelError(f"adaptation diverged at step {step} (loss {terms['loss']}); lower optim.lr")
        scheduler.step()
        ema.update(model, step)
        for name, value in terms.items():
            if name != "grad_norm":
                running[name] = running.get(name, 0.0) + value
        running["_n"] = running.get("_n", 0.0) + 1
        if (step + 1) % max(config.log_every, 1) == 0 or step + 1 == config.steps:
            n = running.pop("_n")
            row = {"step": float(step + 1), **{k: v / n for k, v in running.items()}}
            row["lr"] = float(scheduler.get_last_lr()[0])
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            running = {}
    ema_model = ema.module
    ema_model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return TrainResult(ema_model, history, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def merged_bundle(
    setup: AdaptationSetup,
    cache: Path,
    kind: str,
    config: AdaptationConfig,
    result: TrainResult,
    train_cases: dict[str, list[str]] | None = None,
    rehearsal_buffer: dict[str, list[str]] | None = None,
) -> ModelBundle:
    """The base bundle with the new network, the merged catalog, the new datasets' plans and an
    adaptation record."""
    from hermes.data.cache import open_cache
    from hermes.models.registry import network_spec

    base = setup.base.bundle
    catalog = setup.catalog
    # The merged catalog, serialised (readers prefer it to catalog.yaml: no dataset folder needed),
    # and the trainer's summary keys, kept consistent with it when the base bundle has them.
    updates: dict[str, Any] = {"network": network_spec(result.model), "catalog": catalog.to_dict()}
    summary: dict[str, Any] = {
        "task_names": catalog.task_names,
        "modalities": catalog.modalities,
        "unknown_modality_id": catalog.unknown_modality_id,
        "null_task_id": catalog.null_task_id,
    }
    updates.update({key: value for key, value in summary.items() if getattr(base, key) is not None})
    trained = [entry.name for entry in setup.train_catalog.datasets]
    if not setup.base.is_universal and base.paradigm is not None and len(trained) == 1:
        updates["dataset"] = trained[0]  # a per-dataset model now serves the new dataset
    if base.datasets is not None:
        datasets = [dict(item) for item in base.datasets]
        known = {item.get("name") for item in datasets}
        by_name = {entry.name: entry for entry in catalog.datasets}
        for item in datasets:  # old entries: modality ids may have moved (unknown)
            if item.get("name") in by_name:
                item["modality_id"] = by_name[item["name"]].modality_id
        for entry in setup.train_catalog.datasets:
            if entry.name not in known:
                item = entry.to_dict()
                item.pop("path", None)  # machine-specific, as in `hermes train`'s bundle
                datasets.append(item)
        updates["datasets"] = datasets
    index = open_cache(cache)
    new_plans = {
        name: index.plans[name].to_dict()
        for name in (entry.name for entry in setup.train_catalog.datasets)
        if name in index.plans
    }
    plans = base.preprocessing or Preprocessing()
    by_modality = dict(plans.modalities)
    for name, plan in new_plans.items():
        by_modality.setdefault(catalog.dataset(name).modality, plan)
    updates["preprocessing"] = Preprocessing(datasets={**plans.datasets, **new_plans}, modalities=by_modality)
    record = AdaptationRecord(
        kind=kind,
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        base_model=str(setup.base.directory),
        catalog=str(config.catalog),
        cache=str(cache),
        trained_on=trained,
        added_tasks=[catalog.task_names[i] for i in setup.merged.added_tasks],
        added_modalities=[catalog.modalities[i] for i in setup.merged.added_modalities],
        warm_start=describe_plan(setup.plan, catalog.task_names, catalog.modalities),
        freeze=config.freeze,
        steps=config.steps,
        seconds=round(result.seconds, 1),
        config=config.model_dump(mode="json"),
        final_loss=result.history[-1] if result.history else None,
        train_cases=train_cases,
        rehearsal_buffer=rehearsal_buffer,
    )
    updates["adaptation"] = [*base.adaptation, record]
    return base.model_copy(update=updates, deep=True)


def write_model_dir(directory: Path, model: nn.Module, bundle: ModelBundle, catalog: Catalog) -> Path:
    """weights + bundle + catalog.yaml into ``directory`` (which must exist)."""
    from hermes.models.registry import save_model

    return save_model(directory, model, bundle, catalog_yaml=catalog.to_yaml())


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
