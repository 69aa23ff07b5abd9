"""Merge a trained model's catalog with the catalog of new data (finetune, extend).

The merged catalog keeps every old task and modality at its old id (so old prior rows, old
predictions and old evaluation reports stay valid) and appends what is new:

* a task of the new catalog whose **name** the model knows is the same task (it reuses the
  token: this is how a new dataset labelling "liver" under the same protocol joins an existing
  task); every other task gets a new id ``T_old, T_old + 1, ...``;
* a modality name the model's vocabulary lacks gets the next id; the unknown modality stays
  last (its id moves from ``M_old`` to ``M_new``).

The merge is done on resolved catalogs (``Catalog.from_dict`` of the model's saved catalog), so
the old datasets' folders need not exist on the machine that fine-tunes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from hermes.data.catalog import Catalog, DatasetEntry, TaskSpec
from hermes.data.modalities import UNKNOWN, ModalityVocabulary
from hermes.errors import ConfigError


@dataclass
class MergedCatalog:
    catalog: Catalog
    old_num_tasks: int
    old_num_modalities: int
    # id in the new-data catalog -> id in the merged catalog
    task_map: dict[int, int] = field(default_factory=dict)
    added_tasks: list[int] = field(default_factory=list)  # merged ids of tasks the model lacked
    added_modalities: list[int] = field(default_factory=list)  # merged ids of new modalities
    new_datasets: list[str] = field(default_factory=list)  # names of the new-data datasets

    @property
    def old_unknown_modality_id(self) -> int:
        return self.old_num_modalities

    def old_modality_id(self, merged_id: int) -> int:
        """Id the base model uses for a merged modality id (unknown for modalities it lacks)."""
        return merged_id if merged_id < self.old_num_modalities else self.old_num_modalities


def _merged_spec(old: Catalog, new: Catalog) -> dict[str, Any]:
    spec = copy.deepcopy(old.spec) if old.spec else {"datasets": []}
    spec.setdefault("datasets", [])
    spec["datasets"] = list(spec["datasets"]) + copy.deepcopy(list((new.spec or {}).get("datasets", [])))
    modalities = dict(spec.get("modalities") or {})
    modalities.update((new.spec or {}).get("modalities") or {})
    if modalities:
        spec["modalities"] = modalities
    shared = dict(spec.get("shared_tasks") or {})
    for name, members in ((new.spec or {}).get("shared_tasks") or {}).items():
        shared[name] = sorted(set(shared.get(name, [])) | set(members))
    if shared:
        spec["shared_tasks"] = shared
    return spec


def merge_catalogs(old: Catalog, new: Catalog) -> MergedCatalog:
    """Old catalog + new datasets; raises :class:`ConfigError` on a dataset-name clash."""
    old_names = {entry.name for entry in old.datasets}
    clashes = [entry.name for entry in new.datasets if entry.name in old_names]
    if clashes:
        raise ConfigError(
            f"dataset(s) {', '.join(clashes)} are already part of the model's catalog; the new catalog "
            "must list only datasets the model has not been trained on (give them another `name:` "
            "if they are different data)"
        )

    # Modalities: old vocabulary is a prefix of the merged one. A name is added if the new data
    # uses it (a dataset's or a channel's modality) or its catalog declares it (`modalities:`),
    # not merely because today's built-in list has it (T1c, ADC, DWI joined it later).
    vocabulary = ModalityVocabulary.from_names(old.vocabulary.names, old.vocabulary.families)
    used = {m for entry in new.datasets for m in (entry.modality, *entry.channel_modalities)}
    declared = set((new.spec or {}).get("modalities") or {})
    added_modalities: list[int] = []
    for name in new.vocabulary.names:
        if vocabulary.lookup(name) == UNKNOWN and (name in used or name in declared):
            added_modalities.append(vocabulary.add(name, new.vocabulary.families[name]))

    # Tasks: old ones keep their ids; new names are appended in the new catalog's order.
    tasks = [TaskSpec(t.name, t.index, tuple(t.members)) for t in old.tasks]
    index_of = {task.name: task.index for task in tasks}
    task_map: dict[int, int] = {}
    added_tasks: list[int] = []
    for task in new.tasks:
        if task.name in index_of:
            merged_id = index_of[task.name]
            kept = tasks[merged_id]
            tasks[merged_id] = TaskSpec(kept.name, kept.index, tuple(kept.members) + tuple(task.members))
        else:
            merged_id = len(tasks)
            tasks.append(TaskSpec(task.name, merged_id, tuple(task.members)))
            index_of[task.name] = merged_id
            added_tasks.append(merged_id)
        task_map[task.index] = merged_id

    def modality_id(entry_modality: str) -> int:
        return vocabulary.unknown_id if entry_modality == UNKNOWN else vocabulary.names.index(
            vocabulary.lookup(entry_modality)
        )

    def merged_name(entry_modality: str) -> str:
        return entry_modality if entry_modality == UNKNOWN else vocabulary.lookup(entry_modality)

    datasets: list[DatasetEntry] = [
        replace(entry, task_ids=list(entry.task_ids), modality_id=modality_id(entry.modality))
        for entry in old.datasets
    ]
    for entry in new.datasets:
        datasets.append(
            replace(
                entry,
                task_ids=[task_map[t] for t in entry.task_ids],
                modality_id=modality_id(entry.modality),
                modality=merged_name(entry.modality),
                channel_modalities=tuple(merged_name(m) for m in entry.channel_modalities),
            )
        )

    merged = Catalog(
        tasks=tasks,
        vocabulary=vocabulary,
        datasets=datasets,
        preprocessing=old.preprocessing,
        source=None,
        spec=_merged_spec(old, new),
    )
    return MergedCatalog(
        catalog=merged,
        old_num_tasks=old.num_tasks,
        old_num_modalities=old.num_modalities,
        task_map=task_map,
        added_tasks=added_tasks,
        added_modalities=added_modalities,
        new_datasets=[entry.name for entry in new.datasets],
    )
