"""Case-level annotation availability: which of its dataset's labels a case was annotated for.

Real collections are partially labelled *within* a dataset, not only across datasets: a
radiotherapy planning CT has the organs that were contoured for that plan, so a structure
missing from one case's label map may mean "not contoured" rather than "not here". Training
that case as background for the missing structure teaches the model to erase it. This module
decides, per case, which label values are **annotated**; everything else is left out of the
loss (training) and of the scores (evaluation), exactly like a task of another dataset.

Sources, first match wins (docs/data.md, "Partial labels per case"):

1. a **sidecar** next to the label file, ``labelsTr/CASE.json``: a JSON list of the annotated
   label names (or values), or ``{"annotated": [...]}``;
2. a **table** named in the catalog (``annotations: file.tsv``): tab-separated, a header with
   the columns ``case`` and ``annotated`` (comma-separated names or values; an empty cell means
   none) and optionally ``dataset`` (folder or catalog name, so one file can serve several
   datasets); a case not listed falls through to the rule;
3. the per-label **rule** ``absent_means: background | unannotated`` (a scalar for all labels
   of the dataset, or ``{label: rule}``). A label with voxels in the case is always annotated;
   an absent one is background (the default, today's behaviour: right for lesions, "none
   here") or unannotated (right for organs that are always in the field of view).

An explicit list (sidecar or table) is the whole truth for its case: a label not listed is
unannotated even if it has voxels (e.g. partial, unreliable contours). A task that unites
several labels (``nested_tasks``) is annotated only if every one of its labels is.

Names may be dataset.json label names, label values, or the dataset's nested task names (all
their labels). Resolution is done against a ``names`` mapping ``name -> label values``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hermes.data.imageio import image_suffix
from hermes.errors import DataError

if TYPE_CHECKING:
    from hermes.data.catalog import Catalog, DatasetEntry

log = logging.getLogger(__name__)

AbsentMeans = Literal["background", "unannotated"]
CASE_COLUMNS = ("case", "case_id")
ANNOTATED_COLUMN = "annotated"


# --------------------------------------------------------------------------------------------
# Names -> label values
# --------------------------------------------------------------------------------------------
def entry_names(entry: DatasetEntry) -> dict[str, tuple[int, ...]]:
    """Names a case list may use for a catalog dataset: dataset.json labels and nested tasks."""
    names = {name: (value,) for name, value in entry.labels.items() if value != 0}
    for local, values in zip(entry.local_names, entry.label_values):
        names.setdefault(local, tuple(values))
    return names


def resolve_names(items: Iterable[Any], names: Mapping[str, tuple[int, ...]], where: str) -> set[int]:
    """Label values of a list of names (or values); an unknown one is a DataError naming ``where``."""
    by_value = {v for values in names.values() for v in values}
    folded = {name.lower(): values for name, values in names.items()}
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        if text in names:
            out.update(names[text])
        elif text.lower() in folded:
            out.update(folded[text.lower()])
        elif text.isdigit() and int(text) in by_value:
            out.add(int(text))
        else:
            raise DataError(f"{where}: {text!r} is not a label of this dataset (labels: {', '.join(names)})")
    return out


def sidecar_path(label_path: str | Path) -> Path:
    """``labelsTr/CASE.nii.gz`` -> ``labelsTr/CASE.json``."""
    label_path = Path(label_path)
    suffix = image_suffix(label_path)
    stem = label_path.name[: len(label_path.name) - len(suffix)] if suffix else label_path.stem
    return label_path.with_name(stem + ".json")


def read_sidecar(path: Path, names: Mapping[str, tuple[int, ...]]) -> set[int]:
    """Annotated label values listed in a sidecar JSON (a list, or ``{"annotated": [...]}``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the annotation sidecar ({error})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: the annotation sidecar is not valid JSON: {error}") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {ANNOTATED_COLUMN})
        if unknown or ANNOTATED_COLUMN not in data:
            raise DataError(f"{path}: expected {{\"annotated\": [label names]}} or a list (unknown keys: {unknown})")
        data = data[ANNOTATED_COLUMN]
    if not isinstance(data, list):
        raise DataError(f"{path}: annotated: must be a list of label names")
    return resolve_names(data, names, f"{path}: annotated")


def read_annotation_table(
    path: Path, names: Mapping[str, tuple[int, ...]], dataset_names: Sequence[str] = ()
) -> dict[str, tuple[int, ...]]:
    """``case id -> annotated label values`` of a TSV (rows of other datasets are ignored)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the annotation table ({error})") from None
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    columns = reader.fieldnames or []
    case_column = next((c for c in CASE_COLUMNS if c in columns), None)
    if case_column is None or ANNOTATED_COLUMN not in columns:
        raise DataError(
            f"{path}: the header needs a 'case' and an 'annotated' column (tab-separated); found {columns}"
        )
    wanted = {n.lower() for n in dataset_names}
    out: dict[str, tuple[int, ...]] = {}
    for line, row in enumerate(reader, start=2):
        if "dataset" in columns and wanted and str(row.get("dataset") or "").lower() not in wanted:
            continue
        case = str(row.get(case_column) or "").strip()
        if not case:
            raise DataError(f"{path}: line {line}: empty case id")
        if case in out:
            raise DataError(f"{path}: line {line}: case {case!r} is listed twice")
        cell = row.get(ANNOTATED_COLUMN)
        if cell is None:
            raise DataError(f"{path}: line {line}: missing the 'annotated' cell")
        out[case] = tuple(sorted(resolve_names(cell.split(","), names, f"{path}: line {line}: annotated")))
    return out


# --------------------------------------------------------------------------------------------
# Deciding
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseAnnotation:
    """The explicit list of one case (None: the rule decides) and where it came from."""

    explicit: tuple[int, ...] | None
    source: str  # "sidecar <path>", "table <path>" or "rule"


def explicit_annotation(
    case_id: str,
    label_path: str | Path | None,
    names: Mapping[str, tuple[int, ...]],
    table: Mapping[str, tuple[int, ...]] | None,
    table_path: str | None = None,
) -> CaseAnnotation:
    """The explicit annotated list of a case: its sidecar, else its table row, else none."""
    if label_path is not None:
        sidecar = sidecar_path(label_path)
        if sidecar.is_file():
            return CaseAnnotation(tuple(sorted(read_sidecar(sidecar, names))), f"sidecar {sidecar}")
    if table is not None and case_id in table:
        return CaseAnnotation(tuple(table[case_id]), f"table {table_path}" if table_path else "table")
    return CaseAnnotation(None, "rule")


def annotated_values(
    foreground: Iterable[int],
    present: Iterable[int],
    explicit: Iterable[int] | None,
    absent_unannotated: Iterable[int],
) -> list[int]:
    """Sorted annotated foreground label values of one case (see the module docstring)."""
    if explicit is not None:
        return sorted({int(v) for v in explicit})
    present_set = {int(v) for v in present}
    rule = {int(v) for v in absent_unannotated}
    return sorted(int(v) for v in foreground if int(v) in present_set or int(v) not in rule)


def task_annotation(entry: DatasetEntry, annotated: Iterable[int] | None) -> list[bool]:
    """Per own task of ``entry``: annotated iff all of its label values are (None: all)."""
    if annotated is None:
        return [True] * len(entry.label_values)
    values = {int(v) for v in annotated}
    return [set(task_values) <= values for task_values in entry.label_values]


def cached_task_annotation(meta: Mapping[str, Any], entry: DatasetEntry) -> list[bool]:
    """Per own task, from a cached case's meta.json; caches written before this field existed
    (no ``annotated_labels``) mean "all annotated", which was their behaviour."""
    return task_annotation(entry, meta.get("annotated_labels"))


def entry_case_annotation(entry: DatasetEntry, case_id: str, label_path: str | Path | None) -> CaseAnnotation:
    """:func:`explicit_annotation` with a catalog dataset's names and table."""
    return explicit_annotation(case_id, label_path, entry_names(entry), entry.annotations, entry.annotations_path)


def annotated_of_label(entry: DatasetEntry, case_id: str, label_path: str | Path, present: Iterable[int]) -> list[int]:
    """Annotated label values of a catalog case whose label map holds the values ``present``."""
    explicit = entry_case_annotation(entry, case_id, label_path).explicit
    foreground = [v for v in entry.labels.values() if v != 0]
    return annotated_values(foreground, present, explicit, entry.absent_unannotated)


# --------------------------------------------------------------------------------------------
# `hermes catalog show`: how often each task is absent
# --------------------------------------------------------------------------------------------
@dataclass
class TaskPresence:
    dataset: str
    task: str  # full task name
    local: str  # the dataset's label / nested task name
    cases: int  # labelled training cases
    absent: int  # cases with no voxel of the task
    unannotated: int  # cases where the task is unannotated under the current sources
    rule: AbsentMeans


def label_presence(catalog: Catalog, progress: bool = False) -> list[TaskPresence]:
    """Read every training label map of the catalog once and count, per task, the cases where
    it is absent and those where it is unannotated (sidecar / table / rule)."""
    from tqdm.auto import tqdm

    from hermes.data.imageio import load_image
    from hermes.data.readers import open_dataset

    rows: list[TaskPresence] = []
    for entry in catalog.train_datasets():
        info = open_dataset(entry.path)
        cases = [c for c in info.train_cases() if c.label_path is not None]
        absent = [0] * len(entry.task_ids)
        unannotated = [0] * len(entry.task_ids)
        for case in tqdm(cases, desc=f"labels {entry.name}", unit="case", disable=not progress):
            present = {int(v) for v in np.unique(np.asarray(load_image(case.label_path).array))}  # type: ignore[arg-type]
            annotated = task_annotation(entry, annotated_of_label(entry, case.case_id, case.label_path, present))  # type: ignore[arg-type]
            for t, values in enumerate(entry.label_values):
                absent[t] += not (set(values) & present)
                unannotated[t] += not annotated[t]
        for t, (task_id, local) in enumerate(zip(entry.task_ids, entry.local_names)):
            values = entry.label_values[t]
            rule: AbsentMeans = "unannotated" if set(values) & set(entry.absent_unannotated) else "background"
            rows.append(
                TaskPresence(entry.name, catalog.tasks[task_id].name, local, len(cases), absent[t], unannotated[t], rule)
            )
    return rows


def presence_suggestions(rows: Sequence[TaskPresence]) -> list[str]:
    """One line per task that is absent in some but not all cases and still trained as background."""
    lines = []
    per_dataset: dict[str, list[str]] = {}
    for row in rows:
        if row.rule == "background" and 0 < row.absent < row.cases and row.unannotated == 0:
            per_dataset.setdefault(row.dataset, []).append(row.local)
            lines.append(
                f"{row.task}: absent in {row.absent}/{row.cases} cases: consider `absent_means: {{{row.local}: "
                "unannotated}` if this structure is always in the field of view (keep `background` for lesions)"
            )
        elif row.cases and row.absent == row.cases:
            lines.append(f"{row.task}: absent in every training case ({row.cases}); check the label values")
    for dataset, locals_ in per_dataset.items():
        if len(locals_) > 1:
            rules = ", ".join(f"{local}: unannotated" for local in locals_)
            lines.append(f"{dataset}, all of them (under the dataset's entry): absent_means: {{{rules}}}")
    return lines


# --------------------------------------------------------------------------------------------
# The cache (`hermes prepare`): what meta.json records
# --------------------------------------------------------------------------------------------
def annotation_spec(entry: DatasetEntry, task_names: Sequence[str], case_id: str, label_path: str | Path) -> dict[str, Any]:
    """Everything :func:`annotation_meta` needs besides the label values present (a JSON-able
    job field: it is computed in the parent, where sidecar errors are reported per case)."""
    case = entry_case_annotation(entry, case_id, label_path)
    return {
        "explicit": None if case.explicit is None else list(case.explicit),
        "source": case.source,
        "foreground": sorted(v for v in entry.labels.values() if v != 0),
        "absent_unannotated": list(entry.absent_unannotated),
        "tasks": [[task_names[t], list(values)] for t, values in zip(entry.task_ids, entry.label_values)],
    }


def annotation_meta(spec: Mapping[str, Any], present: Iterable[int]) -> dict[str, Any]:
    """The meta.json fields of a labelled case: ``annotated_labels`` (label values: what the
    sampler, the loss and validation read, valid for any regrouping of the labels into tasks),
    ``annotated_tasks`` (the catalog's task names at prepare time, for people) and
    ``annotation_source`` (sidecar, table or rule)."""
    values = annotated_values(spec["foreground"], present, spec["explicit"], spec["absent_unannotated"])
    chosen = set(values)
    return {
        "annotated_labels": values,
        "annotated_tasks": [name for name, task_values in spec["tasks"] if set(task_values) <= chosen],
        "annotation_source": spec["source"],
    }
