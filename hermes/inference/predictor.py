"""Segment a new image with a saved model, on the image's own voxel grid.

Pipeline per image: choose the modality (given, or the modality head's vote) -> choose the tasks
(given, or every task trained for that modality) -> the model's own preprocessing (its bundle:
reorientation, body crop, resampling to the training spacing, normalisation; the same function
``hermes prepare`` used) -> Gaussian sliding window -> sigmoid -> back to the original grid
(``restore_to_original``: resampled probabilities, un-cropped, original voxel order, so shape and
affine equal the input's) -> threshold -> the model's postprocessing, if decided
(``postprocess.py``: per-task largest component, MODEL/postprocessing.json).

**Prompts.** A Hermes model reads the requested task list as context (the paper always prompts
with one dataset's full task list), so tasks are grouped by the dataset that trained them and
each group is prompted with that dataset's full task list; only the requested channels are
computed at full resolution (``output_tasks``). A model built with
``task_conditioned_features: false`` gives identical logits for any subset, so all tasks then
run in one pass.

**Memory.** One group at a time, and within a group one chunk of tasks at a time, the chunk
as large as ``max_memory_gb`` allows (chunks.py; every chunk reads the group's full prompt, so
the logits do not depend on the chunking): float16 stitching (sliding_window.py), then one
task at a time restored to the original grid and folded into a running "most probable task"
label map, so the peak holds one chunk's cache-space logits plus a few original-size volumes,
independent of the number of tasks.

**Channels.** A multi-channel dataset's image is given as one file per channel in its channel
order; with a model built with ``channel_fusion: mean`` a channel may be missing (``None`` in
the list, a gap in nnU-Net file numbers, or fewer files than channels): it is left out of the
model's channel mean and a :class:`MissingChannelWarning` names it (inference/channels.py).

**Overlaps.** Each task is an independent sigmoid mask. In the multi-label output a voxel gets
the task with the highest probability among those above the threshold ("the most probable
wins"); the binary output keeps every task's own mask, overlaps included.
"""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hermes import __version__
from hermes.bundle import ModelBundle, catalog_path
from hermes.config import InferenceConfig
from hermes.data.catalog import Catalog, DatasetEntry, TaskSpec, load_catalog
from hermes.data.imageio import Image, image_suffix, load_image, save_image
from hermes.data.modalities import UNKNOWN, ModalityVocabulary
from hermes.data.preprocess import PreprocessPlan, preprocess_image, restore_to_original
from hermes.errors import ConfigError, DataError, HermesError, ModelError
from hermes.fileio import atomic_directory, atomic_write_json
from hermes.inference.channels import (
    MissingChannelWarning,
    channel_numbers,
    describe_missing,
    preprocess_present,
    presence,
    stack_given,
)
from hermes.inference.chunks import GIB, memory_plan, split
from hermes.inference.modality_guess import guess_message, reported_probability, trained_for_recognition
from hermes.inference.postprocess import load_postprocessing
from hermes.inference.sliding_window import central_window, sliding_window_inference
from hermes.inference.tta import check_possible, mirrored_network, plan_mirroring, trained_mirror_axes
from hermes.models.channel_stem import reads_channels
from hermes.models.registry import load_model
from hermes.runtime import choose_device, resolve_channels_last

OutputMode = Literal["multilabel", "binary"]
OVERLAP_RULE = "most probable task wins among tasks above the threshold"


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------
def safe_name(task: str) -> str:
    """File name of a task's binary mask: ``HeadNeckCT/Brainstem`` -> ``HeadNeckCT__Brainstem``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", task.replace("/", "__"))


def sidecar_path(image_path: str | Path) -> Path:
    """``seg.nii.gz`` -> ``seg.json``: the label names of a multi-label file."""
    path = Path(image_path)
    suffix = image_suffix(path)
    return path.with_name(path.name[: len(path.name) - len(suffix)] + ".json") if suffix else path.with_suffix(".json")


@dataclass
class Prediction:
    """Masks of one image on its original grid, with what produced them.

    ``labels`` (multi-label output): 0 background, ``i`` = ``tasks[i - 1]``.
    ``masks`` (binary output): task name -> boolean mask.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    tasks: list[str]
    modality: str
    modality_probability: float | None
    modality_source: str  # "given", "predicted", "the model's only modality"
    threshold: float
    labels: np.ndarray | None = None
    masks: dict[str, np.ndarray] | None = None
    input: str | None = None
    model_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def label_map(self) -> dict[str, int]:
        return {"background": 0, **{task: i for i, task in enumerate(self.tasks, start=1)}}

    def mask(self, task: str) -> np.ndarray:
        if self.masks is not None:
            return self.masks[task]
        assert self.labels is not None
        return self.labels == self.tasks.index(task) + 1

    def metadata(self) -> dict[str, Any]:
        return {
            "labels": self.label_map(),
            "tasks": list(self.tasks),
            "modality": self.modality,
            "modality_probability": self.modality_probability,
            "modality_source": self.modality_source,
            "threshold": self.threshold,
            "overlap_rule": OVERLAP_RULE if self.labels is not None else "none: one binary mask per task",
            "input": self.input,
            "model": self.model_dir,
            "hermes_version": __version__,
            **self.extra,
        }

    def save(self, path: str | Path, overwrite: bool = False) -> list[Path]:
        """Multi-label: ``path`` is the image file, label names go to its ``.json`` sidecar.
        Binary: ``path`` is a folder with one ``<task>.nii.gz`` per task and ``labels.json``."""
        path = Path(path)
        check_output(path, overwrite)
        if self.labels is not None:
            # the sidecar marks the pair complete (--continue): never an old sidecar beside a new image
            sidecar_path(path).unlink(missing_ok=True)
            written = [save_image(path, self.labels, self.affine)]
            written.append(atomic_write_json(sidecar_path(path), self.metadata()))
            return written
        assert self.masks is not None
        with atomic_directory(path, overwrite=True) as tmp:
            for task, mask in self.masks.items():
                save_image(tmp / f"{safe_name(task)}.nii.gz", mask.astype(np.uint8), self.affine)
            atomic_write_json(tmp / "labels.json", {**self.metadata(), "files": _binary_files(self.tasks)})
        return [path]


def _binary_files(tasks: Sequence[str]) -> dict[str, str]:
    return {task: f"{safe_name(task)}.nii.gz" for task in tasks}


def check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")


# ----------------------------------------------------------------------------------------------
# Model directory
# ----------------------------------------------------------------------------------------------
def _catalog_from_summary(bundle: ModelBundle) -> Catalog:
    """The catalog as ``hermes train`` records it in the bundle (task names, modality names,
    dataset entries without their machine-specific paths)."""
    datasets = []
    families: dict[str, str] = {}
    for item in bundle.datasets or []:
        entry = DatasetEntry.from_dict({**item, "path": item.get("path") or f"<not stored>/{item['folder']}"})
        datasets.append(entry)
        families.setdefault(entry.modality, entry.family)
    return Catalog(
        tasks=[TaskSpec(str(name), index) for index, name in enumerate(bundle.task_names or [])],
        vocabulary=ModalityVocabulary.from_names([str(m) for m in bundle.modalities or []], families),
        datasets=datasets,
    )


def model_catalog(model_dir: Path, bundle: ModelBundle) -> Catalog:
    """The catalog a model was trained with, without needing its dataset folders: the bundle's
    serialised ``catalog`` (adaptation output), else its ``task_names``/``modalities``/
    ``datasets`` (``hermes train`` output), else MODEL/catalog.yaml."""
    try:
        if bundle.catalog is not None:
            return Catalog.from_dict(bundle.catalog)
        if bundle.task_names is not None and bundle.modalities is not None and bundle.datasets is not None:
            return _catalog_from_summary(bundle)
    except (ConfigError, KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{bundle.where}: invalid catalog information: {error!r}") from None
    return dataset_catalog(model_dir)


def dataset_catalog(model_dir: Path) -> Catalog:
    """MODEL/catalog.yaml resolved against its dataset folders (to evaluate on their cases)."""
    path = catalog_path(model_dir)
    if not path.is_file():
        raise ModelError(f"{model_dir}: no {path.name} (pass the catalog explicitly)")
    try:
        return load_catalog(path)
    except HermesError as error:
        raise ModelError(f"{path}: cannot load the model's catalog: {error}") from None


def _load_plans(bundle: ModelBundle) -> list[PreprocessPlan]:
    """The bundle's preprocessing plans (per dataset, per modality); every distinct plan is a
    candidate."""
    where = bundle.where
    if bundle.preprocessing is None:
        raise ModelError(f"{where}: no 'preprocessing' plans; cannot preprocess images")
    plans: dict[str, PreprocessPlan] = {}
    for key, value in bundle.preprocessing.items():
        try:
            plan = PreprocessPlan.from_dict(value)
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"{where}: preprocessing.{key} is not a plan: {error!r}") from None
        plans.setdefault(plan.digest(), plan)
    if not plans:
        raise ModelError(f"{where}: no preprocessing plans")
    return list(plans.values())


@dataclass(frozen=True)
class PromptGroup:
    """One sliding-window pass: the prompted task ids and which of them are kept."""

    dataset: str | None
    plan: PreprocessPlan
    prompt: tuple[int, ...]
    keep: tuple[int, ...]  # task ids, subset of prompt, in output order


# ----------------------------------------------------------------------------------------------
# Predictor
# ----------------------------------------------------------------------------------------------
class Predictor:
    """A loaded model ready to segment images (load once, predict many)."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        config: InferenceConfig | None = None,
        channels_last: bool | Literal["auto"] = "auto",
        engine: str = "torch",
    ) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelError(f"model directory not found: {self.model_dir}")
        self.config = config or InferenceConfig()
        self.device = choose_device(device)
        self.bundle: ModelBundle
        if engine == "torch":
            self.model, self.bundle = load_model(self.model_dir, device=self.device)
        else:  # the same pipeline around another runtime's network (hermes/inference/onnx_engine.py)
            from hermes.inference.onnx_engine import load_engine

            self.model, self.bundle = load_engine(self.model_dir, engine, self.device)  # type: ignore[assignment]
            channels_last = False
        self.catalog = model_catalog(self.model_dir, self.bundle)
        self.plans = _load_plans(self.bundle)
        self.patch_size = self.bundle.patch_size
        network = self.bundle.network
        self.own_tasks: list[int] | None = network.task_ids_of_model
        self.context_prompts = network.config.task_conditioned_features and self.own_tasks is None
        if self.catalog.num_tasks != network.num_tasks:
            raise ModelError(
                f"{self.model_dir}: the catalog has {self.catalog.num_tasks} tasks, the model {network.num_tasks}"
            )
        self.postprocessing = load_postprocessing(self.model_dir, self.catalog.task_names) if self.config.postprocess else None
        self.trained_mirror_axes = trained_mirror_axes(self.bundle.training, self.bundle.adaptation)
        if self.config.mirror_tta:
            check_possible(self.trained_mirror_axes, self.catalog)  # refuse before any image is read
        self.channels_last = resolve_channels_last(channels_last, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self._preprocessed: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}

    # ---- names ---------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return self.catalog.task_names

    @property
    def available_tasks(self) -> list[str]:
        ids = self.own_tasks if self.own_tasks is not None else range(self.catalog.num_tasks)
        return [self.catalog.tasks[i].name for i in ids]

    @property
    def trained_modalities(self) -> list[str]:
        """Modalities with a preprocessing plan, in vocabulary order."""
        have = {plan.modality for plan in self.plans}
        return [m for m in [*self.catalog.modalities, UNKNOWN] if m in have]

    def resolve_modality(self, name: str) -> str:
        vocab = self.catalog.vocabulary
        found = vocab.lookup(name)
        valid = self.trained_modalities
        if found == UNKNOWN and name.strip().lower() != UNKNOWN:
            raise ConfigError(f"unknown modality {name!r}; this model knows: {', '.join(valid)}")
        if found not in valid:
            raise ConfigError(f"the model was not trained on modality {found!r}; choose one of: {', '.join(valid)}")
        return found

    def resolve_tasks(self, names: Sequence[str]) -> list[int]:
        """Task ids of full names (``Dataset/label``) or unambiguous short forms (``label``,
        ``HeadNeckCT/Brainstem`` for ``Dataset501_HeadNeckCT/Brainstem``), case-insensitive."""
        available = self.available_tasks
        ids: list[int] = []
        for name in names:
            try:
                index = self.catalog.task_index(name)
            except ConfigError:
                index = self._fuzzy_task(name, available)
            if self.catalog.tasks[index].name not in available:
                raise ConfigError(
                    f"task {name!r} is not predicted by this model; valid tasks: {', '.join(available)}"
                )
            if index not in ids:
                ids.append(index)
        if not ids:
            raise ConfigError("no task given")
        return ids

    def _fuzzy_task(self, name: str, available: list[str]) -> int:
        wanted = name.strip().lower()
        dataset_part, _, label_part = wanted.rpartition("/")
        matches = []
        for task in self.catalog.tasks:
            full = task.name.lower()
            t_dataset, _, t_label = full.rpartition("/")
            if t_label != label_part:
                continue
            if not dataset_part:
                matches.append(task)
                continue
            folder_names = {e.folder.lower() for e in self.catalog.datasets_of_task(task.index)}
            names = {t_dataset, *folder_names, *(e.name.lower() for e in self.catalog.datasets_of_task(task.index))}
            if any(dataset_part == n or n.endswith("_" + dataset_part) or n.startswith(dataset_part) for n in names):
                matches.append(task)
        if len(matches) == 1:
            return matches[0].index
        if matches:
            raise ConfigError(f"task name {name!r} is ambiguous; it could be: {', '.join(t.name for t in matches)}")
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(available)}")

    def default_tasks(self, modality: str) -> list[int]:
        """Every task trained for ``modality`` (datasets of that modality in the catalog)."""
        ids: list[int] = []
        for entry in self.catalog.datasets:
            if entry.modality == modality:
                ids.extend(t for t in entry.task_ids if t not in ids)
        if self.own_tasks is not None:
            ids = [t for t in self.own_tasks if t in ids] or list(self.own_tasks)
        if not ids:
            raise ConfigError(
                f"no task was trained for modality {modality!r}; pass tasks explicitly (valid: "
                f"{', '.join(self.available_tasks)})"
            )
        return ids

    # ---- plans and prompts ---------------------------------------------------------------------
    def plan_for(self, modality: str, task_ids: Sequence[int] = ()) -> PreprocessPlan:
        """The plan of the dataset of ``modality`` that holds most of ``task_ids``."""
        candidates = [p for p in self.plans if p.modality == modality]
        if not candidates:
            family = self.catalog.vocabulary.family(modality)
            candidates = [p for p in self.plans if p.body_family == family]
        if not candidates:
            raise ModelError(f"{self.model_dir}: no preprocessing plan for modality {modality!r}")
        by_name = {e.name: e for e in self.catalog.datasets}

        def covered(plan: PreprocessPlan) -> int:
            entry = by_name.get(plan.dataset)
            return sum(t in entry.task_ids for t in task_ids) if entry else 0

        return max(candidates, key=covered)  # max keeps the first plan on ties

    def _dataset_plan(self, entry: DatasetEntry, modality: str) -> PreprocessPlan:
        plan = next((p for p in self.plans if p.dataset == entry.name), None)
        if plan is None or plan.modality != modality:  # a test-only dataset, or another modality
            plan = self.plan_for(modality, entry.task_ids)
        return plan

    def prompt_groups(self, task_ids: Sequence[int], modality: str, dataset: str | None = None) -> list[PromptGroup]:
        """Sliding-window passes for ``task_ids``: grouped by the dataset that trained them
        (``dataset`` forces one dataset's prompt, the paper's oracle), each prompted with its
        dataset's full task list."""
        if dataset is not None:
            entry = self.catalog.dataset(dataset)
            outside = [self.catalog.tasks[t].name for t in task_ids if t not in entry.task_ids]
            if outside:
                raise ConfigError(f"task(s) {', '.join(outside)} are not tasks of dataset {entry.name!r}")
            prompt = tuple(entry.task_ids) if self.context_prompts else tuple(task_ids)
            return [PromptGroup(entry.name, self._dataset_plan(entry, modality), prompt, tuple(task_ids))]
        if not self.context_prompts:
            return [PromptGroup(None, self.plan_for(modality, task_ids), tuple(task_ids), tuple(task_ids))]
        entries = sorted(self.catalog.datasets, key=lambda e: e.modality != modality)  # stable: same modality first
        remaining = list(task_ids)
        groups: list[PromptGroup] = []
        for entry in entries:
            keep = [t for t in remaining if t in entry.task_ids]
            if not keep:
                continue
            remaining = [t for t in remaining if t not in keep]
            groups.append(PromptGroup(entry.name, self._dataset_plan(entry, modality), tuple(entry.task_ids), tuple(keep)))
        if remaining:  # tasks of no dataset (cannot happen with a valid catalog): one plain group
            groups.append(PromptGroup(None, self.plan_for(modality, remaining), tuple(remaining), tuple(remaining)))
        return groups

    # ---- model calls ---------------------------------------------------------------------------
    def _channel_prompt(
        self, plan: PreprocessPlan, present: Sequence[bool], modality_id: int
    ) -> dict[str, torch.Tensor]:
        """``channel_ids``/``channel_mask`` (1, C) for a model that fuses channels: each channel's
        modality from the plan's dataset (the sample's modality when the catalog lacks it)."""
        if not reads_channels(self.model):
            return {}
        entry = next((e for e in self.catalog.datasets if e.name == plan.dataset), None)
        ids = self.catalog.channel_modality_ids(entry) if entry is not None and entry.num_channels == len(present) else None
        return {
            "channel_ids": torch.tensor([ids or [modality_id] * len(present)], dtype=torch.long, device=self.device),
            "channel_mask": torch.tensor([list(present)], dtype=torch.bool, device=self.device),
        }

    def _network(
        self, prompt: Sequence[int], keep: Sequence[int], modality_id: int, channels: dict[str, torch.Tensor] | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        task_row = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        modality = torch.tensor([modality_id], dtype=torch.long, device=self.device)
        index = [list(prompt).index(t) for t in keep]
        # Only the kept tasks' prototypes and voxel-wise dot products are computed (HermesModel's
        # ``output_tasks``); traditional models are always prompted with exactly the kept tasks.
        extra = {} if index == list(range(len(prompt))) else {"output_tasks": index}
        channels = channels or {}

        def network(batch: torch.Tensor) -> torch.Tensor:
            b = batch.shape[0]
            tiled = {key: value.expand(b, -1) for key, value in channels.items()}
            return self.model(batch, task_row.expand(b, -1), modality.expand(b), **extra, **tiled).logits

        return network

    def _group_network(
        self, group: PromptGroup, modality_id: int, channels: dict[str, torch.Tensor] | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The group's network, averaged over the mirrors that are safe for its tasks when TTA is
        on (hermes/inference/tta.py: trained axes, or left-right with declared pairs swapped)."""
        if not self.config.mirror_tta:
            return self._network(group.prompt, group.keep, modality_id, channels)
        if group.dataset is not None:
            entries = [self.catalog.dataset(group.dataset)]
        else:
            entries = [e for e in self.catalog.datasets if set(e.task_ids) & set(group.keep)]
        plan = plan_mirroring(self.trained_mirror_axes, entries)
        extra = plan.extra_tasks(group.keep)  # a swap reads each paired task from its partner
        outputs = [*group.keep, *extra]
        prompt = [*group.prompt, *(t for t in extra if t not in group.prompt)]
        return mirrored_network(self._network(prompt, outputs, modality_id, channels), plan, outputs, len(group.keep))

    def task_chunks(
        self, group: PromptGroup, original_shape: Sequence[int], cache_shape: Sequence[int], verbose: bool = False
    ) -> list[PromptGroup]:
        """``group`` as passes of at most K tasks, K the largest that fits ``max_memory_gb``
        (chunks.py). Each chunk keeps the group's full prompt (the context the unchunked pass
        reads) where the model can compute a subset of it (``output_tasks``); a per-dataset
        model, which computes all its channels anyway, is prompted with the chunk."""
        passes = 2 if self.config.mirror_tta else 1  # TTA: one more float32 sum per window, whatever the axes
        plan = memory_plan(original_shape, cache_shape, self.patch_size, self.config.window_batch_size, passes)
        budget = None if self.config.max_memory_gb is None else self.config.max_memory_gb * GIB
        size = plan.chunk_size(budget, len(group.keep))
        if verbose and budget is not None and plan.peak(size) > budget:
            print(
                f"warning: this image needs about {plan.peak(size) / GIB:.1f} GB even with {size} task(s) per "
                f"pass; --max-memory {self.config.max_memory_gb:g} GB cannot be met",
                file=sys.stderr,
            )
        if size >= len(group.keep):
            return [group]
        chunks = split(group.keep, size)
        if verbose:
            print(
                f"{len(group.keep)} tasks in {len(chunks)} passes of <= {size} (max memory "
                f"{self.config.max_memory_gb:g} GB, estimated peak {plan.peak(size) / GIB:.1f} GB)",
                file=sys.stderr,
            )
        full_prompt = self.context_prompts or self._computes_subsets
        return [replace(group, prompt=group.prompt if full_prompt else chunk, keep=chunk) for chunk in chunks]

    @property
    def _computes_subsets(self) -> bool:
        """Whether the model can compute some prompt positions only (HermesModel.output_tasks)."""
        return "output_tasks" in inspect.signature(self.model.forward).parameters

    def _preprocess(self, images: list[Image], plan: PreprocessPlan) -> tuple[np.ndarray, dict[str, Any]]:
        key = plan.digest()
        if key not in self._preprocessed:
            self._preprocessed[key] = preprocess_image(images, plan)
        return self._preprocessed[key]

    def _present_channels(self, image: Image, plan: PreprocessPlan) -> tuple[bool, ...]:
        """Which of the plan's channels ``image`` brings; a missing one is an error for a model
        with a plain first convolution (it reads every channel)."""
        present = presence(image, plan)
        if not all(present) and not reads_channels(self.model):
            entry = next((e for e in self.catalog.datasets if e.name == plan.dataset), None)
            where = f"{image.path}: " if image.path else ""
            raise DataError(
                f"{where}{describe_missing(present, entry)} of dataset {plan.dataset!r} missing; this model "
                "(model.channel_fusion: none) needs every channel"
            )
        return present

    def _preprocess_present(
        self, image: Image, plan: PreprocessPlan, present: Sequence[bool]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if all(present):
            return self._preprocess([image], plan)
        key = f"{plan.digest()}:{''.join('1' if p else '0' for p in present)}"
        if key not in self._preprocessed:
            self._preprocessed[key] = preprocess_present(image, plan, present)
        return self._preprocessed[key]

    @torch.inference_mode()
    def modality_probabilities(self, images: list[Image]) -> dict[str, float]:
        """Modality head on the central window, prompted with the unknown modality.

        The image must be normalised before the head can see it, and normalisation depends on
        the modality; so every trained modality's plan is tried and a modality scores the
        probability the head gives it when the image is preprocessed *as* that modality.
        """
        if getattr(self.model, "modality_head", None) is None:
            raise ConfigError("this model has no modality head; pass the modality (--modality)")
        scores: dict[str, float] = {}
        unknown = torch.tensor([self.catalog.unknown_modality_id], device=self.device)
        image = images[0]
        for modality in self.trained_modalities:
            if modality == UNKNOWN:
                continue
            plan = self.plan_for(modality, self.default_tasks(modality))
            # Prompt one trained dataset's task list (the context the head was trained with).
            entry = next((e for e in self.catalog.datasets if e.name == plan.dataset), None)
            prompt = list(entry.task_ids) if entry is not None else self.default_tasks(modality)
            if self.own_tasks is not None:
                prompt = list(self.own_tasks)
            try:  # a modality whose plan cannot take this image's channels is not a candidate
                present = self._present_channels(image, plan)
            except DataError:
                continue
            array, meta = self._preprocess_present(image, plan, present)
            window = central_window(
                torch.from_numpy(np.asarray(array, dtype=np.float32))[None], self.patch_size, meta.get("pad_value", 0.0)
            )
            window = window.to(self.device)
            if self.channels_last:
                window = window.contiguous(memory_format=torch.channels_last_3d)
            channels = self._channel_prompt(plan, present, self.catalog.unknown_modality_id)
            out = self.model(window, torch.tensor([prompt], device=self.device), unknown, **channels)
            probs = torch.softmax(out.modality_logits.float(), dim=1)[0]
            scores[modality] = float(probs[self.catalog.modalities.index(modality)])
        if not scores:
            raise DataError(
                f"{image.path or 'the image'}: its {len(channel_numbers(image))} channel(s) fit no trained "
                "modality's preprocessing; pass --modality or --dataset"
            )
        return scores

    # ---- main entry ----------------------------------------------------------------------------
    def load_case(self, inputs: str | Path | Image | Sequence[str | Path | Image | None]) -> Image:
        """One image from a file, a DICOM folder, an :class:`Image`, or one file per channel
        (stacked on a 4th axis; all channels must share the first one's grid). In a list,
        ``None`` marks a missing channel: the result is then a ``PartialImage`` that knows
        which channel numbers it holds (inference/channels.py)."""
        if isinstance(inputs, Image):
            return inputs
        allow = self.config.allow_irregular_dicom
        if isinstance(inputs, str | Path):
            return load_image(inputs, allow_irregular=allow)
        if any(x is None for x in inputs):
            return stack_given(
                [x if x is None or isinstance(x, Image) else load_image(x, allow_irregular=allow) for x in inputs]
            )
        items = [x if isinstance(x, Image) else load_image(x, allow_irregular=allow) for x in inputs]  # type: ignore[arg-type]
        if not items:
            raise DataError("no input image given")
        if len(items) == 1:
            return items[0]
        first = items[0]
        for item in items[1:]:
            if item.array.shape[:3] != first.array.shape[:3] or not np.allclose(item.affine, first.affine, atol=1e-3):
                raise DataError(f"{item.path}: channel grid differs from {first.path}")
        stacked = np.stack([np.asarray(x.array, dtype=np.float32) for x in items], axis=-1)
        return Image(stacked, first.affine, first.path)

    def predict(
        self,
        image: str | Path | Image | Sequence[str | Path | Image | None],
        tasks: Sequence[str] | None = None,
        modality: str | None = None,
        output: OutputMode | None = None,
        progress: bool = True,
        on_mask: Callable[[str, np.ndarray], None] | None = None,
        verbose: bool = False,
        dataset: str | None = None,
    ) -> Prediction:
        """Segment one image. ``on_mask(task, mask)``: called per task in binary mode instead of
        keeping the masks (lets the CLI write each mask as soon as it exists). ``dataset``:
        prompt as that catalog dataset (its task list, modality and plan), the paper's oracle;
        its tasks are the default tasks."""
        output = output or self.config.output
        image = self.load_case(image)
        self._preprocessed.clear()
        images = [image]
        shape = tuple(int(n) for n in image.array.shape[:3])

        # Modality
        probability: float | None = None
        scores: dict[str, float] = {}
        if modality is None and dataset is not None:
            modality = self.catalog.dataset(dataset).modality
        if modality is not None:
            chosen, source = self.resolve_modality(modality), "given"
        elif len([m for m in self.trained_modalities if m != UNKNOWN]) == 1 and (
            getattr(self.model, "modality_head", None) is None or self.own_tasks is not None
        ):
            chosen, source = next(m for m in self.trained_modalities if m != UNKNOWN), "the model's only modality"
        elif self.own_tasks is not None or getattr(self.model, "modality_head", None) is None:
            raise ConfigError(
                f"this model cannot recognise the modality; pass one of: {', '.join(self.trained_modalities)}"
            )
        else:
            scores = self.modality_probabilities(images)
            chosen = max(scores, key=lambda m: scores[m])
            # the head is uncalibrated: report a capped value (hermes/inference/modality_guess.py)
            probability, source = reported_probability(scores[chosen]), "predicted"
        modality_id = (
            self.catalog.unknown_modality_id if chosen == UNKNOWN else self.catalog.modalities.index(chosen)
        )

        # Tasks
        if tasks:
            task_ids = self.resolve_tasks(tasks)
        elif dataset is not None:
            task_ids = list(self.catalog.dataset(dataset).task_ids)
        else:
            task_ids = self.default_tasks(chosen)
        names = [self.catalog.tasks[t].name for t in task_ids]
        position = {t: i for i, t in enumerate(task_ids)}
        guessed: dict[str, Any] = {}
        if source == "predicted":
            guessed["modality_scores"] = {m: round(p, 4) for m, p in scores.items()}  # raw softmax, uncalibrated
            if verbose:
                owners = [e.name for e in self.catalog.datasets if any(t in e.task_ids for t in task_ids)]
                message = guess_message(chosen, scores, names, owners, trained_for_recognition(self.bundle.training))
                print(message, file=sys.stderr)

        threshold = float(self.config.threshold)
        labels: np.ndarray | None = None
        best: np.ndarray | None = None
        masks: dict[str, np.ndarray] | None = None
        if output == "multilabel":
            labels = np.zeros(shape, dtype=np.uint8 if len(task_ids) < 256 else np.uint16)
            best = np.zeros(shape, dtype=np.float16)
        elif output == "binary":
            masks = {} if on_mask is None else None
        else:
            raise ConfigError(f"unknown output {output!r} (multilabel or binary)")

        missing: dict[str, str] = {}
        for group in self.prompt_groups(task_ids, chosen, dataset):
            present = self._present_channels(image, group.plan)
            if not all(present):
                entry = next((e for e in self.catalog.datasets if e.name == group.plan.dataset), None)
                missing[group.plan.dataset] = describe_missing(present, entry)
                warnings.warn(
                    f"{image.path or 'input image'}: missing {missing[group.plan.dataset]} of dataset "
                    f"{group.plan.dataset!r}; predicting from the {sum(present)} channel(s) present",
                    MissingChannelWarning,
                    stacklevel=2,
                )
            array, meta = self._preprocess_present(image, group.plan, present)
            channels = self._channel_prompt(group.plan, present, modality_id)
            tensor = torch.from_numpy(np.asarray(array, dtype=np.float32))[None]
            for chunk in self.task_chunks(group, shape, tensor.shape[2:], verbose):
                logits = sliding_window_inference(
                    tensor,
                    self._group_network(chunk, modality_id, channels),
                    self.patch_size,
                    overlap=self.config.overlap,
                    window_batch_size=self.config.window_batch_size,
                    blend=self.config.blend,
                    device=self.device,
                    precision=self.config.precision,
                    channels_last=self.channels_last,
                    progress=progress,
                    pad_value=meta.get("pad_value", 0.0),
                )
                for k, task in enumerate(chunk.keep):
                    prob_cache = torch.sigmoid(logits[k].float())
                    prob = restore_to_original(prob_cache, meta, order=1, fill=0.0)
                    del prob_cache
                    name = self.catalog.tasks[task].name
                    above = prob >= threshold
                    if labels is None and self.postprocessing is not None:  # binary: per mask
                        above = self.postprocessing.apply_mask(name, above)
                    if labels is not None and best is not None:
                        wins = above & (prob > best)
                        labels[wins] = position[task] + 1
                        best[wins] = prob[wins]
                    elif masks is not None:
                        masks[name] = above
                    elif on_mask is not None:
                        on_mask(name, above)
                del logits
        self._preprocessed.clear()
        extra: dict[str, Any] = dict(guessed)
        if missing:
            extra["missing_channels"] = missing
        if self.postprocessing is not None:  # multi-label: on the final map, as it was decided
            if labels is not None:
                self.postprocessing.apply_labels(labels, names)
            extra["postprocessing"] = {"largest_component": [t for t in names if t in self.postprocessing.largest_component]}
        return Prediction(
            affine=np.asarray(image.affine, dtype=np.float64),
            shape=shape,  # type: ignore[arg-type]
            tasks=names,
            modality=chosen,
            modality_probability=probability,
            modality_source=source,
            threshold=threshold,
            labels=labels,
            masks=masks,
            input=str(image.path) if image.path else None,
            model_dir=str(self.model_dir),
            extra=extra,
        )


def describe(prediction: Prediction) -> str:
    prob = "" if prediction.modality_probability is None else f", p={prediction.modality_probability:.2f}"
    return (
        f"modality {prediction.modality} ({prediction.modality_source}{prob}); "
        f"{len(prediction.tasks)} task(s): {', '.join(prediction.tasks)}"
    )


__all__ = ["OVERLAP_RULE", "Prediction", "Predictor", "describe", "safe_name", "sidecar_path"]
