"""The saved-model folder: :class:`ModelBundle`, the one code that reads and writes it.

::

    MODEL/weights.safetensors   the network's tensors (safetensors: no pickle, no code)
    MODEL/spec.json             this module's ModelBundle: format "hermes-model", schema_version 2
    MODEL/catalog.yaml          the training catalog (dataset folders; hermes.data.catalog reads it)
    MODEL/postprocessing.json   optional: per-task largest-component decision (inference/postprocess.py)

``ModelBundle.load(folder)`` reads ``spec.json``, migrates a folder written by an older Hermes
(:func:`migrate_spec`) and validates it (unknown keys are errors; a problem raises
:class:`ModelError` naming the file); ``bundle.save(folder, weights, catalog_yaml)`` writes the
weights, then the spec, then the catalog, each atomically (hermes/fileio.py), so a folder with
a spec always has its weights. Other modules never name these files: they ask for
:func:`weights_path`, :func:`catalog_path`, :func:`postprocessing_path`, or call the readers
and writers below. The values inside are kept as the stage that owns them writes them (a
catalog's ``to_dict``, a preprocessing plan's ``to_dict``, a config's dump): this module
imports no stage, so every stage may import it.

Schema versions: 1 (``"version": 1``, or no version at all) had a top-level ``patch_size`` (the
training run's, which an adapted model inherited from its base model) beside the network's,
the network entry under ``model``, and the preprocessing plans either as ``{"datasets",
"modalities"}`` or as one flat ``{name: plan}``. Version 2 keeps each of these once: the
patch under ``network``, the plans always in the two sections.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from hermes.config import ModelConfig
from hermes.errors import DataError, ModelError
from hermes.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch

FORMAT = "hermes-model"
SCHEMA_VERSION = 2
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"
CATALOG_FILE = "catalog.yaml"
POSTPROCESSING_FILE = "postprocessing.json"


# ----------------------------------------------------------------------------------------------
# The files of a model folder
# ----------------------------------------------------------------------------------------------
def spec_path(folder: str | Path) -> Path:
    return Path(folder) / SPEC_FILE


def weights_path(folder: str | Path) -> Path:
    return Path(folder) / WEIGHTS_FILE


def catalog_path(folder: str | Path) -> Path:
    return Path(folder) / CATALOG_FILE


def postprocessing_path(folder: str | Path) -> Path:
    return Path(folder) / POSTPROCESSING_FILE


def is_model_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved model (its spec, written after its weights)."""
    return spec_path(folder).is_file()


def write_weights(folder: str | Path, state: Mapping[str, torch.Tensor]) -> Path:
    """``weights.safetensors`` from a state dict, atomically."""
    from safetensors.torch import save as safetensors_bytes

    # safetensors refuses tensors that share storage (MONAI DynUNet registers its encoder blocks
    # twice: under input_block/downsamples and under skip_layers), so the second name gets a copy;
    # loading fills both names with equal values, which is what the aliasing held.
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        key = tensor.untyped_storage().data_ptr()
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        tensors[name] = tensor
    return atomic_write_bytes(weights_path(folder), safetensors_bytes(tensors))


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``weights.safetensors`` (on the CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = weights_path(folder)
    if not path.is_file():
        raise ModelError(f"{path}: not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelError(f"{path}: unreadable or corrupt: {error}") from None


def write_catalog(folder: str | Path, text: str) -> Path:
    """``catalog.yaml``: the training catalog as ``Catalog.to_yaml`` writes it."""
    return atomic_write_text(catalog_path(folder), text)


def read_postprocessing(folder: str | Path) -> dict[str, Any] | None:
    """The parsed ``postprocessing.json``, or None when the model has none."""
    path = postprocessing_path(folder)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: not a postprocessing file: {error}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a postprocessing file: not a JSON object")
    return data


def write_postprocessing(folder: str | Path, data: Mapping[str, Any], overwrite: bool = False) -> Path:
    path = postprocessing_path(folder)
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; pass --overwrite to replace the stored postprocessing decision")
    return atomic_write_json(path, dict(data))


# ----------------------------------------------------------------------------------------------
# spec.json
# ----------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def migrate_model_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved model config in today's schema: keys added since are filled with the value that
    reproduces the saved network (a model saved before ``prototype_logit`` existed used "dot",
    one saved before ``channel_fusion`` its plain first convolution, "none", one saved before
    ``feature_head`` the bare decoder features, "linear")."""
    migrated = dict(saved)
    migrated.setdefault("prototype_logit", "dot")
    migrated.setdefault("channel_fusion", "none")
    migrated.setdefault("feature_head", "linear")
    return migrated


class NetworkSpec(_Strict):
    """What ``hermes.models.registry.build_model`` needs to rebuild the saved network."""

    config: ModelConfig
    num_tasks: int
    num_modalities: int
    task_ids_of_model: list[int] | None  # a per-dataset network's own task ids; None: Hermes
    patch_size: list[int] | None  # the patch the network was built and trained with

    @field_validator("config", mode="before")
    @classmethod
    def _migrate_config(cls, value: Any) -> Any:
        return migrate_model_config(value) if isinstance(value, dict) else value

    @field_validator("patch_size")
    @classmethod
    def _three_sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(value) != 3:
            raise ValueError(f"needs 3 sizes, got {value}")
        return value


class Preprocessing(_Strict):
    """Preprocessing plans (``PreprocessPlan.to_dict``): per training dataset, and per modality
    (the plan of its dataset with the most training cases, for images of an unseen dataset)."""

    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    modalities: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        """(``section.name``, plan) of every plan, datasets first."""
        return [
            *((f"datasets.{name}", plan) for name, plan in self.datasets.items()),
            *((f"modalities.{name}", plan) for name, plan in self.modalities.items()),
        ]


class TrainingRecord(_Strict):
    """What ``hermes train`` records about the run (all optional: a model may come from elsewhere)."""

    steps: int | None = None
    seed: int | None = None
    precision: str | None = None
    validation_dice: dict[str, float | None] | None = None
    validation_cases: dict[str, list[str]] | None = None  # held out per dataset (`evaluate --split val`)
    config: dict[str, Any] | None = None  # the full TrainConfig, as dumped
    final_weights: str | None = None  # "ema" or "raw"
    validation_dice_by_weights: dict[str, dict[str, float | None]] | None = None
    note: str | None = None


class AdaptationRecord(_Strict):
    """One ``hermes finetune`` / ``hermes extend`` applied to the model."""

    kind: str | None = None
    date: str | None = None
    base_model: str | None = None
    catalog: str | None = None
    cache: str | None = None
    trained_on: list[str] | None = None
    added_tasks: list[str] | None = None
    added_modalities: list[str] | None = None
    warm_start: list[str] | None = None
    freeze: str | None = None
    steps: int | None = None
    seconds: float | None = None
    config: dict[str, Any] | None = None  # the AdaptationConfig, as dumped
    final_loss: dict[str, float | None] | None = None
    train_cases: dict[str, list[str]] | None = None
    rehearsal_buffer: dict[str, list[str]] | None = None


class ModelBundle(_Strict):
    """``spec.json``: everything prediction, evaluation and adaptation need besides the weights."""

    format: Literal["hermes-model"] = FORMAT
    schema_version: Literal[2] = SCHEMA_VERSION
    paradigm: Literal["universal", "traditional"] | None = None
    dataset: str | None = None  # a per-dataset model's dataset
    # The catalog summary `hermes train` writes: global task list, modality vocabulary, prompt ids
    # and the training datasets' entries (``DatasetEntry.to_dict`` without the machine's path).
    task_names: list[str] | None = None
    modalities: list[str] | None = None
    unknown_modality_id: int | None = None
    null_task_id: int | None = None
    datasets: list[dict[str, Any]] | None = None
    preprocessing: Preprocessing | None = None
    training: TrainingRecord | None = None
    network: NetworkSpec
    # Adaptation output: the merged catalog (``Catalog.to_dict``) and what was applied, in order.
    catalog: dict[str, Any] | None = None
    adaptation: list[AdaptationRecord] = Field(default_factory=list)

    _source: Path | None = PrivateAttr(default=None)

    # ---- reading --------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path) -> ModelBundle:
        """The bundle of a model folder (or of an ONNX export folder, which has its spec too)."""
        path = spec_path(folder)
        if not path.is_file():
            raise ModelError(f"{path}: not found (is {folder} a saved model directory?)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelError(f"{path}: not valid JSON: {error}") from None
        bundle = cls.from_dict(raw, path)
        bundle._source = path
        return bundle

    @classmethod
    def from_dict(cls, raw: Any, where: str | Path = SPEC_FILE) -> ModelBundle:
        """A spec of any schema version, migrated and validated."""
        if not isinstance(raw, dict):
            raise ModelError(f"{where}: not a JSON object")
        try:
            return cls.model_validate(migrate_spec(raw, where))
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in item['loc']) or '(top level)'}: {item['msg']}" for item in error.errors()
            )
            raise ModelError(f"{where}: not a valid model spec: {problems}") from None

    @property
    def where(self) -> Path | str:
        """The file this bundle was read from (for messages)."""
        return self._source or SPEC_FILE

    @property
    def patch_size(self) -> list[int]:
        """The patch the network was built and trained with (sliding window, adaptation default)."""
        if self.network.patch_size is None:
            raise ModelError(f"{self.where}: no patch_size (a 3-number list) in the network entry")
        return list(self.network.patch_size)

    @property
    def is_universal(self) -> bool:
        """A Hermes network (any task through its priors), not one output channel per own task."""
        return self.network.task_ids_of_model is None

    def summary(self) -> dict[str, Any]:
        """The keys an export's description repeats: tasks, modalities, patch, plans."""
        catalog = self.catalog or {}
        return {
            "patch_size": self.patch_size,
            "task_names": self.task_names or [t["name"] for t in catalog.get("tasks", [])],
            "modalities": self.modalities or catalog.get("modalities"),
            "preprocessing": None if self.preprocessing is None else self.preprocessing.model_dump(mode="json"),
        }

    # ---- writing --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def write_spec(self, folder: str | Path) -> Path:
        """``spec.json`` alone (an ONNX export folder: the graph replaces the weights)."""
        return atomic_write_json(spec_path(folder), self.to_dict())

    def save(
        self, folder: str | Path, weights: Mapping[str, torch.Tensor], catalog_yaml: str | None = None
    ) -> Path:
        """Weights, then spec (a folder with a spec has its weights), then ``catalog.yaml``."""
        folder = Path(folder)
        write_weights(folder, weights)
        self.write_spec(folder)
        if catalog_yaml is not None:
            write_catalog(folder, catalog_yaml)
        return folder


# ----------------------------------------------------------------------------------------------
# Migration
# ----------------------------------------------------------------------------------------------
def _is_patch(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3


def _from_version_1(old: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2. Version 1's readers ignored entries of the wrong type, so they are dropped."""
    spec = {k: v for k, v in old.items() if k not in ("version", "patch_size", "model")}
    spec["schema_version"] = 2
    if "model" in old:
        network = old["model"]
        if isinstance(network, dict):
            network = dict(network)
            # The network's own patch came first; the top-level copy (the run's) was the fallback.
            if not _is_patch(network.get("patch_size")) and _is_patch(old.get("patch_size")):
                network["patch_size"] = list(old["patch_size"])
        spec["network"] = network
    plans = old.get("preprocessing")
    if not isinstance(plans, dict) or not plans:
        spec.pop("preprocessing", None)
    elif isinstance(plans.get("datasets"), dict) or isinstance(plans.get("modalities"), dict):
        spec["preprocessing"] = {"datasets": plans.get("datasets") or {}, "modalities": plans.get("modalities") or {}}
    else:  # flat {name: plan} (adaptation output of version 1 when its base had no sections)
        spec["preprocessing"] = {"datasets": plans, "modalities": {}}
    for key in ("training", "catalog"):
        if not isinstance(spec.get(key), dict):
            spec.pop(key, None)
    if not isinstance(spec.get("adaptation"), list):
        spec.pop("adaptation", None)
    return spec


def migrate_spec(raw: dict[str, Any], where: str | Path = SPEC_FILE) -> dict[str, Any]:
    """A spec dict of any known schema version in today's layout (schema 2)."""
    version = raw.get("schema_version")
    if version is None:  # version 1 wrote "version": 1; hand-written specs may have neither
        if raw.get("version", 1) != 1:
            raise ModelError(f"{where}: unknown spec version {raw.get('version')!r}")
        return _from_version_1(raw)
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION or version < 2:
        raise ModelError(
            f"{where}: schema_version {version!r} is not one this Hermes reads (1 to {SCHEMA_VERSION}); "
            "a newer Hermes wrote it?"
        )
    return raw

