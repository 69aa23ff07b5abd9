"""The catalog: which datasets a model learns from, and which task each label feeds.

A catalog is a YAML file (format and examples in docs/data.md)::

    modalities: {SPECT: pet}             # extra vocabulary entries: name -> family
    datasets:
      - path: Dataset101_AbdomenCT       # relative to this file; nnU-Net v2 raw or MSD
        name: AbdomenCT                  # default: folder name without "DatasetNNN_"
        modality: CT                     # default: the first channel's modality
        channel_modalities: [FLAIR, T1, T1c, T2]   # per channel; default: dataset.json's names
        labels: [liver, kidney]          # default: every foreground label
        nested_tasks: {kidney_all: [kidney, kidney_tumour]}   # a task = a union of labels
        tasks: {liver: liver_ct}         # rename a task; equal names across datasets = shared
        snomed: {liver: "10200004"}      # SNOMED CT code of a task (DICOM-SEG output); optional
        test_only: false                 # true: never sampled for training (may lack imagesTr)
        absent_means: {Esophagus: unannotated}   # or a scalar; default background (annotation.py)
        annotations: cases.tsv           # per-case annotated label lists (annotation.py)
        mirror_pairs: [[kidney_left, kidney_right]]   # left/right pairs (see below)
    shared_tasks:
      liver_ct: [AbdomenCT/liver, TotalSegCT/liver]
    preprocessing: {target_spacing: [1.5, 1.5, 1.5]}       # hermes.config.PreprocessConfig

A **task** is one structure under one annotation protocol. By default every selected label of
every dataset is its own task ``<dataset name>/<label name>``; datasets whose protocols agree
are merged into one shared task explicitly (never guessed: ``hermes catalog show`` only
*suggests* candidates). Labels stay mutually exclusive, as in the dataset's own label map; a
nested region (e.g. a kidney including its tumour) is an explicit ``nested_tasks`` entry.

``mirror_pairs`` states that the dataset's anatomy is mirror-symmetric along the left-right
axis (axis 0 of the canonical RAS arrays) once each listed ``[left, right]`` pair of its labels
(or nested tasks) is swapped, and that every other task is symmetric itself (a midline or
bilateral structure). Only then may mirroring test-time augmentation flip that axis of a model
trained without mirroring (``hermes predict --tta``); leave it out for a dataset with a
one-sided structure (liver, spleen), and give ``[]`` for a dataset whose tasks are all symmetric.

Task ids are ``0..T-1`` in order of first appearance (datasets in catalog order, labels in
value order, then nested tasks); the null task is ``T``. Modality ids are ``0..M-1`` over the
whole vocabulary (built-ins then extras, so ids stay stable when datasets are added) and the
unknown modality is ``M``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hermes.config import PreprocessConfig, read_yaml, validate
from hermes.data.annotation import AbsentMeans, read_annotation_table
from hermes.data.modalities import UNKNOWN, ModalityVocabulary
from hermes.errors import ConfigError, DataError

_PREFIX = re.compile(r"^Dataset\d{3,}_(?P<rest>.+)$")


# --------------------------------------------------------------------------------------------
# YAML schema (unknown keys are errors naming the key)
# --------------------------------------------------------------------------------------------
class _DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    name: str | None = None
    modality: str | None = None
    channel_modalities: list[str] | None = None
    labels: list[str | int] | None = None
    nested_tasks: dict[str, list[str | int]] = Field(default_factory=dict)
    tasks: dict[str, str] = Field(default_factory=dict)
    snomed: dict[str, str] = Field(default_factory=dict)
    test_only: bool = False
    absent_means: AbsentMeans | dict[str, AbsentMeans] = "background"
    annotations: str | None = None
    mirror_pairs: list[list[str | int]] | None = None  # [[left, right], ...]

    @field_validator("absent_means", mode="before")
    @classmethod
    def _rule(cls, value: Any) -> Any:
        """One readable error instead of pydantic's per-union-member pair."""
        rules = ("background", "unannotated")
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, rule in items:
            if rule not in rules:
                where = f"{key}: " if key is not None else ""
                raise ValueError(f"{where}{rule!r} must be 'background' or 'unannotated' (or a mapping label: rule)")
        return value


class _CatalogSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[_DatasetSpec]
    modalities: dict[str, str] = Field(default_factory=dict)
    shared_tasks: dict[str, list[str]] = Field(default_factory=dict)
    preprocessing: PreprocessConfig = Field(default_factory=PreprocessConfig)


# --------------------------------------------------------------------------------------------
# Resolved catalog
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    name: str
    index: int
    # (dataset name, local task name) of every dataset label that feeds this task.
    members: tuple[tuple[str, str], ...] = ()

    @property
    def short_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]


@dataclass
class DatasetEntry:
    name: str  # short, unique in the catalog; the cache folder name
    path: Path  # absolute dataset folder
    folder: str  # folder name, e.g. "Dataset101_AbdomenCT"
    modality: str  # vocabulary name or "unknown": the dataset's modality prompt
    modality_id: int  # 0..M-1, or M for unknown
    family: str  # normalisation family of the modality: ct, pet or mr
    channel_names: tuple[str, ...]
    labels: dict[str, int]  # every label of dataset.json, background included
    task_ids: list[int]  # this dataset's tasks, in its label order
    label_values: list[tuple[int, ...]]  # per task (aligned with task_ids): label values united
    local_names: list[str]  # per task: the label (or nested task) name inside the dataset
    test_only: bool = False
    num_train: int = 0
    num_test: int = 0
    # Case-level annotation (hermes/data/annotation.py): label values whose absence from a
    # case means "not annotated", and the catalog's per-case table (case id -> label values).
    absent_unannotated: tuple[int, ...] = ()
    annotations: dict[str, tuple[int, ...]] | None = None
    annotations_path: str | None = None
    # Left/right task-id pairs swapped by a left-right mirror; None: no symmetry declared.
    mirror_pairs: tuple[tuple[int, int], ...] | None = None
    snomed: dict[str, str] = field(default_factory=dict)  # local task name -> SNOMED CT code
    # Modality (vocabulary name or "unknown") of each channel, in channel order: what the
    # per-channel stem of `model.channel_fusion: mean` is conditioned on. Empty: every channel
    # has the dataset's modality (entries serialised before channel modalities existed: only
    # `channel_fusion: none` models, which do not read them, were saved then).
    channel_modalities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.channel_modalities:
            self.channel_modalities = (self.modality,) * len(self.channel_names)
        if len(self.channel_modalities) != len(self.channel_names):
            raise ConfigError(
                f"dataset {self.name!r}: {len(self.channel_modalities)} channel modalities for "
                f"{len(self.channel_names)} channels ({', '.join(self.channel_names)})"
            )

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def label_to_tasks(self) -> dict[int, list[int]]:
        """Label value -> task ids it is positive for (several only with nested tasks)."""
        mapping: dict[int, list[int]] = {}
        for task_id, values in zip(self.task_ids, self.label_values):
            for value in values:
                mapping.setdefault(value, []).append(task_id)
        return mapping

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "folder": self.folder,
            "modality": self.modality,
            "modality_id": self.modality_id,
            "family": self.family,
            "channel_names": list(self.channel_names),
            "channel_modalities": list(self.channel_modalities),
            "labels": dict(self.labels),
            "task_ids": list(self.task_ids),
            "label_values": [list(v) for v in self.label_values],
            "local_names": list(self.local_names),
            "test_only": self.test_only,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "absent_unannotated": list(self.absent_unannotated),
            "annotations": None if self.annotations is None else {k: list(v) for k, v in self.annotations.items()},
            "annotations_path": self.annotations_path,
            "mirror_pairs": None if self.mirror_pairs is None else [list(p) for p in self.mirror_pairs],
            **({"snomed": dict(self.snomed)} if self.snomed else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetEntry:
        return cls(
            name=str(data["name"]),
            path=Path(data["path"]),
            folder=str(data["folder"]),
            modality=str(data["modality"]),
            modality_id=int(data["modality_id"]),
            family=str(data["family"]),
            channel_names=tuple(str(c) for c in data["channel_names"]),
            channel_modalities=tuple(str(m) for m in data.get("channel_modalities") or ()),
            labels={str(k): int(v) for k, v in data["labels"].items()},
            task_ids=[int(t) for t in data["task_ids"]],
            label_values=[tuple(int(v) for v in values) for values in data["label_values"]],
            local_names=[str(n) for n in data["local_names"]],
            test_only=bool(data.get("test_only", False)),
            num_train=int(data.get("num_train", 0)),
            num_test=int(data.get("num_test", 0)),
            absent_unannotated=tuple(int(v) for v in data.get("absent_unannotated", ())),
            annotations=(
                None
                if data.get("annotations") is None
                else {str(k): tuple(int(x) for x in v) for k, v in data["annotations"].items()}
            ),
            annotations_path=data.get("annotations_path"),
            mirror_pairs=None
            if data.get("mirror_pairs") is None
            else tuple((int(a), int(b)) for a, b in data["mirror_pairs"]),
            snomed={str(k): str(v) for k, v in (data.get("snomed") or {}).items()},
        )


@dataclass
class Catalog:
    tasks: list[TaskSpec]
    vocabulary: ModalityVocabulary
    datasets: list[DatasetEntry]
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    source: Path | None = None  # the YAML file, when loaded from one
    spec: dict[str, Any] = field(default_factory=dict)  # the YAML mapping, paths made absolute

    # ---- sizes and ids ---------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.vocabulary.names)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def null_task_id(self) -> int:
        return len(self.tasks)

    @property
    def num_modalities(self) -> int:
        return len(self.vocabulary)

    @property
    def unknown_modality_id(self) -> int:
        return self.vocabulary.unknown_id

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def train_datasets(self) -> list[DatasetEntry]:
        return [entry for entry in self.datasets if not entry.test_only and entry.num_train > 0]

    # ---- look-ups ----------------------------------------------------------------------------
    def dataset(self, name: str) -> DatasetEntry:
        for entry in self.datasets:
            if name in (entry.name, entry.folder):
                return entry
        raise ConfigError(f"unknown dataset {name!r}; the catalog has: {', '.join(e.name for e in self.datasets)}")

    def task_index(self, name: str) -> int:
        """Id of a task by full name, or by an unambiguous short name (``liver``)."""
        for task in self.tasks:
            if task.name == name:
                return task.index
        matches = [task for task in self.tasks if task.short_name == name]
        if not matches:
            folded = name.lower()
            matches = [task for task in self.tasks if folded in (task.name.lower(), task.short_name.lower())]
        if len(matches) == 1:
            return matches[0].index
        if matches:
            raise ConfigError(
                f"task name {name!r} is ambiguous; it could be: {', '.join(t.name for t in matches)}"
            )
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(self.task_names)}")

    def task(self, name: str) -> TaskSpec:
        return self.tasks[self.task_index(name)]

    def datasets_of_task(self, task_id: int) -> list[DatasetEntry]:
        return [entry for entry in self.datasets if task_id in entry.task_ids]

    def channel_modality_ids(self, entry: DatasetEntry) -> list[int]:
        """Model modality id of each of ``entry``'s channels (``M`` = unknown), from the names:
        a merged catalog (hermes/adaptation/merge.py) renumbers ids, never names."""
        vocabulary = self.vocabulary
        return [vocabulary.unknown_id if m == UNKNOWN else vocabulary.id(m) for m in entry.channel_modalities]

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything resolved, so :meth:`from_dict` needs no dataset folder (saved in caches/models)."""
        return {
            "version": 1,
            "tasks": [{"name": t.name, "index": t.index, "members": [list(m) for m in t.members]} for t in self.tasks],
            "vocabulary": self.vocabulary.to_dict(),
            "datasets": [entry.to_dict() for entry in self.datasets],
            "preprocessing": self.preprocessing.model_dump(mode="json"),
            "source": str(self.source) if self.source else None,
            "spec": self.spec,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Catalog:
        try:
            tasks = [
                TaskSpec(str(t["name"]), int(t["index"]), tuple((str(a), str(b)) for a, b in t.get("members", [])))
                for t in data["tasks"]
            ]
            return cls(
                tasks=tasks,
                vocabulary=ModalityVocabulary.from_dict(data["vocabulary"]),
                datasets=[DatasetEntry.from_dict(d) for d in data["datasets"]],
                preprocessing=validate(PreprocessConfig, data.get("preprocessing") or {}, "catalog.preprocessing"),
                source=Path(data["source"]) if data.get("source") else None,
                spec=dict(data.get("spec") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"invalid serialised catalog: {error!r}") from None

    def to_yaml(self) -> str:
        """The catalog as YAML (dataset paths absolute), loadable with :func:`load_catalog`."""
        return yaml.safe_dump(self.spec, sort_keys=False)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
def short_name(folder_name: str) -> str:
    """``Dataset101_AbdomenCT`` -> ``AbdomenCT``; other names unchanged."""
    match = _PREFIX.match(folder_name)
    return match["rest"] if match else folder_name


def _label_value(labels: dict[str, int], item: str | int, where: str, json_path: Path) -> tuple[str, int]:
    """Resolve a label given by name (or value) against dataset.json."""
    by_value = {v: k for k, v in labels.items()}
    if isinstance(item, int) or (isinstance(item, str) and item.isdigit() and item not in labels):
        value = int(item)
        if value not in by_value or value == 0:
            raise ConfigError(
                f"{where}: label value {value} is not a foreground label of {json_path} "
                f"(it has {', '.join(f'{k}={v}' for k, v in labels.items() if v)})"
            )
        return by_value[value], value
    if item not in labels or labels[item] == 0:
        raise ConfigError(
            f"{where}: label {item!r} is not a foreground label of {json_path} "
            f"(it has: {', '.join(k for k, v in labels.items() if v)})"
        )
    return str(item), labels[item]


def _declared_modality(name: str, vocabulary: ModalityVocabulary, where: str) -> str:
    """A modality the catalog states (``modality:``, ``channel_modalities:``): a vocabulary
    name or ``unknown``; anything else is a typo, not a guess."""
    if name == UNKNOWN:
        return UNKNOWN
    found = vocabulary.lookup(name)
    if found == UNKNOWN:
        raise ConfigError(
            f"{where}: unknown modality {name!r}; known: {', '.join(vocabulary.names)}, "
            f"'unknown', or declare it under `modalities:` with its family (ct, pet, mr)"
        )
    return found


def _channel_modalities(
    ds: _DatasetSpec, channel_names: tuple[str, ...], vocabulary: ModalityVocabulary, where: str
) -> tuple[str, ...]:
    """Each channel's modality: the catalog's ``channel_modalities`` (checked), else
    dataset.json's channel names mapped to the vocabulary (a vague name gives ``unknown``)."""
    if ds.channel_modalities is None:
        return tuple(vocabulary.lookup(name) for name in channel_names)
    if len(ds.channel_modalities) != len(channel_names):
        raise ConfigError(
            f"{where}.channel_modalities: {len(ds.channel_modalities)} names for the dataset's "
            f"{len(channel_names)} channel(s) ({', '.join(channel_names)})"
        )
    return tuple(
        _declared_modality(name, vocabulary, f"{where}.channel_modalities[{i}]")
        for i, name in enumerate(ds.channel_modalities)
    )


def _annotation_settings(
    ds: _DatasetSpec, info: Any, locals_: list[tuple[str, tuple[int, ...]]], where: str, base_dir: Path
) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]] | None, str | None]:
    """Resolve ``absent_means`` and ``annotations`` of one dataset (hermes/data/annotation.py)."""
    json_path = info.path / "dataset.json"
    foreground = sorted(v for v in info.labels.values() if v != 0)
    if isinstance(ds.absent_means, str):
        unannotated = foreground if ds.absent_means == "unannotated" else []
    else:
        unannotated = []
        for key, rule in ds.absent_means.items():
            _, value = _label_value(info.labels, key, f"{where}.absent_means.{key}", json_path)
            if rule == "unannotated":
                unannotated.append(value)
    table: dict[str, tuple[int, ...]] | None = None
    table_path: str | None = None
    if ds.annotations is not None:
        path = Path(ds.annotations).expanduser()
        path = (path if path.is_absolute() else base_dir / path).resolve()
        if not path.is_file():
            raise ConfigError(f"{where}.annotations: annotation table not found: {path}")
        names = {k: (v,) for k, v in info.labels.items() if v != 0}
        for local, values in locals_:
            names.setdefault(local, values)
        try:
            table = read_annotation_table(path, names, [info.name, ds.name or short_name(info.name)])
        except DataError as error:
            raise ConfigError(f"{where}.annotations: {error}") from None
        known = {case.case_id for case in info.cases}
        stray = sorted(set(table) - known)
        if stray:
            raise ConfigError(f"{where}.annotations: {path}: case(s) not in the dataset: {', '.join(stray[:5])}")
        table_path = str(path)
    return tuple(sorted(set(unannotated))), table, table_path


def build_catalog(spec: dict[str, Any], base_dir: Path, source: str = "<catalog>") -> Catalog:
    """Validate a catalog mapping and resolve it against the dataset folders it names."""
    from hermes.data.readers import open_dataset  # deferred: keeps `import catalog` light

    parsed = validate(_CatalogSpec, spec, source)
    if not parsed.datasets:
        raise ConfigError(f"{source}: datasets: the catalog lists no dataset")

    vocabulary = ModalityVocabulary.builtin()
    for name, family in parsed.modalities.items():
        try:
            vocabulary.add(name, family)
        except ConfigError as error:
            raise ConfigError(f"{source}: modalities.{name}: {error}") from None

    # Local tasks per dataset: (dataset name, local name) -> label values.
    entries: list[DatasetEntry] = []
    local_tasks: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    resolved_spec: dict[str, Any] = {key: value for key, value in spec.items() if key != "datasets"}
    resolved_spec["datasets"] = []
    seen_paths: dict[Path, str] = {}
    for index, ds in enumerate(parsed.datasets):
        where = f"{source}: datasets[{index}]"
        folder = Path(ds.path).expanduser()
        folder = (folder if folder.is_absolute() else base_dir / folder).resolve()
        if not folder.is_dir():
            raise ConfigError(f"{where}.path: dataset folder not found: {folder}")
        if folder in seen_paths:
            raise ConfigError(f"{where}.path: {folder} is already listed as dataset {seen_paths[folder]!r}")
        try:
            info = open_dataset(folder)
        except DataError as error:
            raise ConfigError(f"{where}.path: {error}") from None
        name = ds.name or short_name(info.name)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
            raise ConfigError(f"{where}.name: {name!r} must be letters, digits, '_', '-' or '.' (it names a cache folder)")
        clash = next((e for e in entries if e.name == name), None)
        if clash is not None:
            raise ConfigError(
                f"{where}: dataset name {name!r} is already used by {clash.folder}; give one of them a `name:`"
            )
        seen_paths[folder] = name

        channel_modalities = _channel_modalities(ds, info.channel_names, vocabulary, where)
        modality = channel_modalities[0] if ds.modality is None else _declared_modality(
            ds.modality, vocabulary, f"{where}.modality"
        )
        if len(channel_modalities) == 1 and ds.channel_modalities is None:
            channel_modalities = (modality,)  # `modality:` names the one channel too
        family = "mr" if modality == UNKNOWN else vocabulary.families[modality]

        json_path = folder / "dataset.json"
        if ds.labels is None:
            selected = [(k, v) for k, v in info.labels.items() if v != 0]
        else:
            selected = [_label_value(info.labels, item, f"{where}.labels", json_path) for item in ds.labels]
            if len({v for _, v in selected}) != len(selected):
                raise ConfigError(f"{where}.labels: a label is listed twice")
            selected.sort(key=lambda item: item[1])
        locals_: list[tuple[str, tuple[int, ...]]] = [(k, (v,)) for k, v in selected]
        for nested, members in ds.nested_tasks.items():
            if nested in info.labels:
                raise ConfigError(f"{where}.nested_tasks.{nested}: the name is already a label of {json_path}")
            if not members:
                raise ConfigError(f"{where}.nested_tasks.{nested}: needs at least one label")
            values = sorted({_label_value(info.labels, m, f"{where}.nested_tasks.{nested}", json_path)[1] for m in members})
            locals_.append((nested, tuple(values)))
        if not locals_:
            raise ConfigError(f"{where}: the dataset has no foreground label to learn")
        for local in ds.tasks:
            if local not in {n for n, _ in locals_}:
                raise ConfigError(
                    f"{where}.tasks.{local}: not a selected label or nested task of this dataset "
                    f"(choices: {', '.join(n for n, _ in locals_)})"
                )
        for local, code in ds.snomed.items():
            if local not in {n for n, _ in locals_}:
                raise ConfigError(
                    f"{where}.snomed.{local}: not a selected label or nested task of this dataset "
                    f"(choices: {', '.join(n for n, _ in locals_)})"
                )
            if not re.fullmatch(r"\d{6,18}", code):
                raise ConfigError(f"{where}.snomed.{local}: {code!r} is not a SNOMED CT concept id (6-18 digits)")

        absent_unannotated, table, table_path = _annotation_settings(ds, info, locals_, where, base_dir)

        n_train, n_test = len(info.train_cases()), len(info.test_cases())
        if n_train == 0 and not ds.test_only:
            raise ConfigError(
                f"{where}: {folder} has no training cases; add `test_only: true` if it is meant for testing only"
            )
        if n_train + n_test == 0:
            raise ConfigError(f"{where}: {folder} has no cases at all")
        local_tasks[name] = locals_
        entries.append(
            DatasetEntry(
                name=name,
                path=folder,
                folder=info.name,
                modality=modality,
                modality_id=vocabulary.id(modality) if modality != UNKNOWN else vocabulary.unknown_id,
                family=family,
                channel_names=info.channel_names,
                labels=dict(info.labels),
                task_ids=[],
                label_values=[],
                local_names=[],
                test_only=ds.test_only,
                num_train=n_train,
                num_test=n_test,
                absent_unannotated=absent_unannotated,
                annotations=table,
                annotations_path=table_path,
                snomed=dict(ds.snomed),
                channel_modalities=channel_modalities,
            )
        )
        raw = ds.model_dump(exclude_defaults=True)
        raw["path"] = str(folder)
        if table_path is not None:
            raw["annotations"] = table_path
        resolved_spec["datasets"].append(raw)

    # Task name of every (dataset, local task): default, renamed by `tasks`, or shared.
    task_of: dict[tuple[str, str], str] = {}
    for ds, entry in zip(parsed.datasets, entries):
        for local, _ in local_tasks[entry.name]:
            task_of[(entry.name, local)] = ds.tasks.get(local, f"{entry.name}/{local}")
    default_names = {f"{d}/{local}": (d, local) for d, local in task_of}
    claimed: dict[tuple[str, str], str] = {}
    for shared, members in parsed.shared_tasks.items():
        where = f"{source}: shared_tasks.{shared}"
        if not members:
            raise ConfigError(f"{where}: lists no member task")
        for member in members:
            if member not in default_names:
                raise ConfigError(
                    f"{where}: {member!r} is not a default task name `<dataset>/<label>`; "
                    f"valid: {', '.join(default_names)}"
                )
            key = default_names[member]
            if key in claimed:
                raise ConfigError(f"{where}: {member!r} is already in shared task {claimed[key]!r}")
            if task_of[key] != member:
                raise ConfigError(f"{where}: {member!r} is already renamed to {task_of[key]!r} by the dataset's `tasks:`")
            claimed[key] = shared
            task_of[key] = shared

    # A task name must come from one kind of source: several datasets sharing it is the point,
    # but two labels of one dataset, or a shared name equal to another dataset's default task
    # name, is a duplicate that would silently merge two structures.
    tasks: list[TaskSpec] = []
    index_of: dict[str, int] = {}
    members_of: dict[str, list[tuple[str, str]]] = {}
    for entry in entries:
        used_here: set[str] = set()
        for local, values in local_tasks[entry.name]:
            task_name = task_of[(entry.name, local)]
            if task_name in used_here:
                raise ConfigError(
                    f"{source}: duplicate task name {task_name!r}: two labels of dataset {entry.name!r} map to it "
                    "(to unite labels use nested_tasks)"
                )
            used_here.add(task_name)
            default_owner = default_names.get(task_name)
            if default_owner is not None and default_owner != (entry.name, local) and task_of[default_owner] == task_name:
                raise ConfigError(
                    f"{source}: duplicate task name {task_name!r}: it is also the default name of "
                    f"{default_owner[0]}'s label {default_owner[1]!r}; choose another name"
                )
            if task_name not in index_of:
                index_of[task_name] = len(index_of)
                members_of[task_name] = []
            members_of[task_name].append((entry.name, local))
            entry.task_ids.append(index_of[task_name])
            entry.label_values.append(values)
            entry.local_names.append(local)
    for task_name, index in index_of.items():
        tasks.append(TaskSpec(task_name, index, tuple(members_of[task_name])))
    for index, (ds, entry) in enumerate(zip(parsed.datasets, entries)):
        if ds.mirror_pairs is not None:
            entry.mirror_pairs = _mirror_pairs(ds.mirror_pairs, entry, f"{source}: datasets[{index}].mirror_pairs")

    return Catalog(
        tasks=tasks,
        vocabulary=vocabulary,
        datasets=entries,
        preprocessing=parsed.preprocessing,
        source=None,
        spec=resolved_spec,
    )


def _mirror_pairs(
    pairs: list[list[str | int]], entry: DatasetEntry, where: str
) -> tuple[tuple[int, int], ...]:
    """``[[left, right], ...]`` of local label (or nested task) names/values -> task-id pairs."""
    by_local = dict(zip(entry.local_names, entry.task_ids))
    by_value = {values[0]: task for task, values in zip(entry.task_ids, entry.label_values) if len(values) == 1}
    resolved: list[tuple[int, int]] = []
    used: set[int] = set()
    for number, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ConfigError(f"{where}[{number}]: a pair is [left, right] (two tasks), got {pair!r}")
        ids = []
        for item in pair:
            if isinstance(item, str) and item in by_local:
                ids.append(by_local[item])
            elif str(item).isdigit() and int(item) in by_value:
                ids.append(by_value[int(item)])
            else:
                raise ConfigError(
                    f"{where}[{number}]: {item!r} is not a task of dataset {entry.name!r} "
                    f"(its tasks: {', '.join(entry.local_names)})"
                )
        if ids[0] == ids[1]:
            raise ConfigError(f"{where}[{number}]: a task cannot be its own mirror pair")
        if used & set(ids):
            raise ConfigError(f"{where}[{number}]: a task is in two pairs")
        used.update(ids)
        resolved.append((ids[0], ids[1]))
    return tuple(resolved)


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog YAML; dataset paths are relative to the catalog file."""
    path = Path(path).resolve()
    data = read_yaml(path)
    catalog = build_catalog(data, path.parent, str(path))
    catalog.source = path
    return catalog


def default_catalog_spec(folders: list[Path], relative_to: Path | None = None) -> dict[str, Any]:
    """A catalog mapping listing ``folders`` with defaults (for ``hermes catalog init``)."""
    from hermes.data.readers import open_dataset

    datasets = []
    for folder in folders:
        info = open_dataset(folder)
        path = folder.resolve()
        if relative_to is not None:
            base = relative_to.resolve()
            # Relative (with '..' if needed) when both share a folder below '/', else absolute.
            if os.path.commonpath([path, base]) != path.anchor:
                path = Path(os.path.relpath(path, base))
        entry: dict[str, Any] = {"path": str(path)}
        if not info.train_cases():
            entry["test_only"] = True
        datasets.append(entry)
    return {"datasets": datasets}


def share_candidates(catalog: Catalog) -> list[tuple[str, list[str]]]:
    """Unshared tasks that look like one structure: same label name and modality family.

    Returns (suggested name ``<label>_<family>``, member task names) pairs. Label names are
    compared case-insensitively and as a set of words (``kidney_right`` = ``Right kidney``).

    Only a suggestion: two datasets' "kidney" may follow different protocols (with or without
    the tumour), which is exactly why sharing is never automatic.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for entry in catalog.datasets:
        for task_id, local in zip(entry.task_ids, entry.local_names):
            task = catalog.tasks[task_id]
            if len(task.members) > 1:
                continue
            key = (" ".join(sorted(re.split(r"[^a-z0-9]+", local.lower()))).strip(), entry.family)
            groups.setdefault(key, []).append(task.name)
    suggestions = []
    for (label, family), names in groups.items():
        datasets = {name.split("/", 1)[0] for name in names}
        if len(datasets) > 1:
            suggestions.append((f"{label.replace(' ', '_')}_{family}", names))
    return suggestions
