"""Incremental learning (`hermes extend`): add tasks/datasets, keep the old tasks.

Plain fine-tuning on new data forgets: nothing in the loss asks the network to keep answering
the old tasks. `hermes extend` adds two standard counter-measures and a safety gate:

* **rehearsal**: a fixed buffer of ``rehearsal_cases`` training cases per old dataset (a seeded
  draw from the old cache) supplies ``rehearsal_batch`` old samples appended to every batch,
  supervised on their own (old) tasks exactly as in the original training;
* **distillation** (learning without forgetting): for every new sample, one old dataset with
  the same modality is drawn and its task list is the prompt; the frozen base model's sigmoid
  outputs on the new image are the target of the new model's outputs for those old tasks
  (``mse`` on probabilities, or ``bce`` with the soft targets), weighted by
  ``distill_weight``. Old tasks of another modality are not distilled from new images: a CT
  liver prior has no business answering on an MR volume;
* **forgetting gate**: the old tasks are evaluated on their test sets (``hermes evaluate``'s
  scoring, native grid) with the base model before and with the new model after training; if
  any old task's mean Dice drops by more than ``forgetting_tolerance`` points the model is not
  replaced: the new one is written next to it as ``<output>.rejected`` with a warning, and the
  command exits with status 3. The before/after table is printed and saved as JSON.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hermes.adaptation import engine
from hermes.adaptation.gate import GateResult, compare
from hermes.config import ExtendConfig
from hermes.data.cache import open_cache
from hermes.data.cache_lock import read_lock
from hermes.data.catalog import Catalog
from hermes.errors import ConfigError, DataError
from hermes.fileio import atomic_directory, atomic_write_json
from hermes.models.channel_stem import channel_inputs

log = logging.getLogger(__name__)

# model dir, dataset names, max cases per dataset -> {task name: (mean Dice 0-100 or None, cases)}
Evaluator = Callable[[Path, list[str], int | None], dict[str, tuple[float | None, int]]]
GATE_FAILED_EXIT = 3


# --------------------------------------------------------------------------------------------
# Evaluation used by the gate
# --------------------------------------------------------------------------------------------
def make_evaluator(device: str | None = None, progress: bool = True) -> Evaluator:
    """Per-task mean Dice (0-100) of a saved model on its catalog's test cases."""

    def evaluate(model_dir: Path, datasets: list[str], max_cases: int | None) -> dict[str, tuple[float | None, int]]:
        from hermes.config import EvaluationConfig, InferenceConfig
        from hermes.evaluation.evaluate import evaluate_model

        result = evaluate_model(
            model_dir,
            datasets=datasets,
            device=device,
            # the networks are compared: a base model's postprocessing.json would favour it
            inference=InferenceConfig(postprocess=False),
            config=EvaluationConfig(bootstrap_samples=0, workers=1),
            progress=progress,
            max_cases=max_cases,
        )
        return task_dice(result.summary)

    return evaluate


def task_dice(summary: dict[str, Any]) -> dict[str, tuple[float | None, int]]:
    """{task: (mean Dice in points, cases)} from an evaluation summary; a task scored in several
    datasets (shared task) is averaged over them, weighted by their case counts."""
    sums: dict[str, list[float]] = {}
    for entry in summary["datasets"].values():
        for task, stats in entry["tasks"].items():
            mean, n = stats["dice"]["mean"], int(stats["dice"]["n"])
            acc = sums.setdefault(task, [0.0, 0.0, 0.0])
            acc[2] += int(stats.get("n_cases", n))
            if mean is not None and np.isfinite(mean) and n > 0:
                acc[0] += 100.0 * float(mean) * n
                acc[1] += n
    return {task: ((s / n) if n else None, int(c)) for task, (s, n, c) in sums.items()}


def gate_datasets(config: ExtendConfig, catalog: Catalog) -> list[str]:
    """Old datasets whose test cases the gate scores."""
    names = [entry.name for entry in catalog.datasets if entry.num_test > 0]
    if config.gate_datasets is not None:
        unknown = sorted(set(config.gate_datasets) - {entry.name for entry in catalog.datasets})
        if unknown:
            raise ConfigError(f"gate_datasets: {', '.join(unknown)} are not datasets of the base model")
        names = [name for name in names if name in set(config.gate_datasets)]
    return names


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------
@dataclass
class Distiller:
    """Distillation term on the new samples' images for old tasks of the same modality."""

    teacher: nn.Module
    old_catalog: Catalog  # the base model's (old ids)
    merged_unknown: int  # unknown modality id in the merged catalog
    new_null: int  # null task id of the new model
    weight: float
    kind: str  # "mse" | "bce"
    seed: int
    rehearsal_samples: int = 0  # trailing samples of each batch that come from the old data

    def __post_init__(self) -> None:
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.by_modality: dict[int, list[list[int]]] = {}
        for entry in self.old_catalog.datasets:
            if entry.test_only:
                continue
            self.by_modality.setdefault(entry.modality_id, []).append(list(entry.task_ids))

    def _old_modality(self, merged_id: int) -> int | None:
        """Base-model modality id of a merged id (None: a modality the base model lacks)."""
        old_unknown = self.old_catalog.unknown_modality_id
        if merged_id == self.merged_unknown:
            return old_unknown
        return merged_id if merged_id < old_unknown else None

    def prompts(self, modality_ids: list[int], step: int) -> tuple[list[list[int]], list[int]]:
        rng = np.random.default_rng([self.seed, 7, step])
        prompts: list[list[int]] = []
        keep: list[int] = []
        for b, merged_id in enumerate(modality_ids):
            old_id = self._old_modality(merged_id)
            choices = self.by_modality.get(old_id, []) if old_id is not None else []
            if choices:
                prompts.append(choices[int(rng.integers(len(choices)))])
                keep.append(b)
        return prompts, keep

    def __call__(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        n_new = batch["image"].shape[0] - self.rehearsal_samples
        modality_ids = [int(m) for m in batch["modality_id"][:n_new].tolist()]
        prompts, keep = self.prompts(modality_ids, step)
        zero = batch["image"].new_zeros(())
        if not keep or self.weight == 0:
            return {"distill": zero}
        device = batch["image"].device
        width = max(len(p) for p in prompts)
        old_null = self.old_catalog.null_task_id
        ids_old = torch.full((len(keep), width), old_null, dtype=torch.long, device=device)
        mask = torch.zeros((len(keep), width), dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            ids_old[row, : len(prompt)] = torch.tensor(prompt, device=device)
            mask[row, : len(prompt)] = True
        ids_new = torch.where(mask, ids_old, torch.full_like(ids_old, self.new_null))
        index = torch.tensor(keep, device=device)
        image = batch["image"].index_select(0, index)
        merged_modality = batch["modality_id"].index_select(0, index)
        old_modality = torch.tensor(
            [self._old_modality(int(m)) for m in merged_modality.tolist()], dtype=torch.long, device=device
        )
        teacher_channels = channel_inputs(self.teacher, batch, index=index)
        if teacher_channels:  # merged modality ids -> the base model's (a new modality is unknown to it)
            old_unknown = self.old_catalog.unknown_modality_id
            ids = teacher_channels["channel_ids"]
            teacher_channels["channel_ids"] = torch.where(ids < old_unknown, ids, torch.full_like(ids, old_unknown))
        with torch.no_grad():
            target = torch.sigmoid(self.teacher(image, ids_old, old_modality, mask, **teacher_channels).logits.float())
        logits = model(image, ids_new, merged_modality, mask, **channel_inputs(model, batch, index=index)).logits.float()
        if self.kind == "bce":
            per_voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            per_voxel = (torch.sigmoid(logits) - target) ** 2
        per_channel = per_voxel.flatten(2).mean(-1)  # (B, T)
        loss = (per_channel * mask).sum() / mask.sum().clamp_min(1)
        return {"distill": self.weight * loss}


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
@dataclass
class ExtendOutcome:
    written_to: Path
    gate: GateResult | None
    report: dict[str, Any]

    @property
    def accepted(self) -> bool:
        return self.gate is None or self.gate.passed


def rehearsal_buffer(config: ExtendConfig, old_catalog: Catalog) -> dict[str, list[str]]:
    """``rehearsal_cases`` seeded training cases per old dataset present in the old cache."""
    if config.old_cache is None or config.rehearsal_cases == 0:
        return {}
    index = open_cache(config.old_cache)
    cached = index.train_cases()
    names = [entry.name for entry in old_catalog.datasets if not entry.test_only]
    absent = [name for name in names if not cached.get(name)]
    if absent:
        raise DataError(
            f"old_cache {config.old_cache}: no cached training cases of {', '.join(absent)}; "
            "give the cache the base model was trained from"
        )
    return engine.choose_cases(cached, names, config.rehearsal_cases, config.seed + 1, str(config.old_cache))


def _replace_dir(source: Path, destination: Path) -> None:
    """Move ``source`` to ``destination``, replacing it: the old one is moved aside first so a
    crash leaves either the old or the new directory under the name, never a mix."""
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old.{os.getpid()}")
        os.replace(destination, old)
    os.replace(source, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_extend(
    config: ExtendConfig,
    device: str | torch.device | None = None,
    evaluator: Evaluator | None = None,
    gate: bool = True,
    force: bool = False,
    progress: bool = True,
) -> ExtendOutcome:
    """Train the extension, run the gate, write the model where the verdict says."""
    from hermes.runtime import choose_device

    dev = choose_device(device)
    base = engine.load_base(config.base_model, dev)
    if not base.is_universal:
        raise ConfigError(
            f"{config.base_model} is a per-dataset (traditional) model: it cannot answer new tasks; "
            "use `hermes finetune` for transfer"
        )
    destination = Path(config.output) if config.output is not None else Path(config.base_model)
    if destination.exists() and destination.resolve() != Path(config.base_model).resolve():
        raise ConfigError(f"output {destination} exists and is not the base model; remove it or choose another")
    evaluator = evaluator or make_evaluator(str(dev), progress)

    # 1. old tasks before (fail early if the old test data is missing)
    old_names = gate_datasets(config, base.catalog) if gate else []
    if gate and not old_names:
        raise ConfigError("the forgetting gate needs old datasets with test cases; none has any (or pass --no-gate)")
    before = evaluator(base.directory, old_names, config.gate_max_cases) if gate else {}
    old_tasks = set(base.catalog.task_names)
    before = {task: value for task, value in before.items() if task in old_tasks}

    # 2. train
    setup = engine.prepare(config, dev, base=base)
    data = engine.data_config_for(config, base)
    index = open_cache(config.cache)
    names = [entry.name for entry in setup.train_catalog.datasets]
    cases = engine.choose_cases(index.train_cases(), names, config.max_train_cases, config.seed, str(config.cache))
    batches = engine.make_loader(setup.train_catalog, config.cache, data, cases, config.seed)
    extra_batches = None
    buffer = rehearsal_buffer(config, base.catalog)
    if buffer and config.rehearsal_batch > 0:
        old_catalog = engine.subset_catalog(setup.catalog, list(buffer))
        rehearsal_data = data.model_copy(update={"batch_size": config.rehearsal_batch, "num_workers": 0})
        extra_batches = engine.make_loader(old_catalog, Path(config.old_cache), rehearsal_data, buffer, config.seed + 1)  # type: ignore[arg-type]
    distiller = None
    if config.distill_weight > 0:
        distiller = Distiller(
            teacher=base.model,
            old_catalog=base.catalog,
            merged_unknown=setup.catalog.unknown_modality_id,
            new_null=setup.catalog.null_task_id,
            weight=config.distill_weight,
            kind=config.distill_loss,
            seed=config.seed,
            rehearsal_samples=config.rehearsal_batch if extra_batches is not None else 0,
        )
    # Never read a cache that `hermes prepare` is writing.
    with read_lock(config.cache), read_lock(config.old_cache or config.cache):
        result = engine.train(
            setup.model, batches, config, dev, frozen=setup.frozen, extra_batches=extra_batches,
            extra_loss=distiller, null_task_id=setup.catalog.null_task_id, progress=progress,
        )
    bundle = engine.merged_bundle(
        setup, Path(config.cache), "extend", config, result, train_cases=cases, rehearsal_buffer=buffer
    )

    # 3. write to a staging directory, score it, decide
    staging = destination.with_name(f".{destination.name}.extend-staging.{os.getpid()}")
    with atomic_directory(staging, overwrite=True) as tmp:
        engine.write_model_dir(tmp, result.model, bundle, setup.catalog)
        atomic_write_json(tmp / "adaptation_log.json", {"history": result.history})
    outcome_gate: GateResult | None = None
    report: dict[str, Any] = {"base_model": str(base.directory), "destination": str(destination)}
    try:
        if gate:
            after = evaluator(staging, old_names, config.gate_max_cases)
            new_names = [n for n in setup.merged.new_datasets if setup.catalog.dataset(n).num_test > 0]
            new_scores = evaluator(staging, new_names, config.gate_max_cases) if new_names else {}
            added = {setup.catalog.task_names[i] for i in setup.merged.added_tasks}
            outcome_gate = compare(
                before, after, config.forgetting_tolerance,
                {task: value[0] for task, value in new_scores.items() if task in added or task not in before},
            )
            report["gate"] = outcome_gate.to_dict()
        else:
            report["gate"] = None
        accepted = outcome_gate is None or outcome_gate.passed or force
        target = destination if accepted else destination.with_name(destination.name + ".rejected")
        report["accepted"] = accepted
        report["forced"] = bool(force and outcome_gate is not None and not outcome_gate.passed)
        report["written_to"] = str(target)
        atomic_write_json(staging / "extend_report.json", report)
        _replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if not accepted:
        log.warning(
            "forgetting gate failed: %s dropped more than %g Dice points; %s was NOT replaced, the new model is in %s",
            ", ".join(c.task for c in outcome_gate.violations),  # type: ignore[union-attr]
            config.forgetting_tolerance, destination, target,
        )
    return ExtendOutcome(target, outcome_gate, report)
