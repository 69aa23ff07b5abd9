"""Score segmentations per case and task, summarise with bootstrap CIs, write CSV/JSON/report.

Two entry points share one scoring path (the reference code had two diverging ones):

* :func:`evaluate_folders` scores any folder of multi-label predictions against a reference
  folder in nnU-Net's layout (``CASE.nii.gz`` in both), so nnU-Net's, MONAI's or Hermes' own
  outputs are scored identically;
* :func:`evaluate_model` predicts a catalog's test cases with a saved model (on the native
  grid of every case: nothing is scored on the preprocessed or GT-cropped grid) and scores
  each dataset's tasks against the labels the catalog maps to them.

Outputs: ``metrics.csv`` (one row per case x task), ``summary.json`` (per dataset and task:
mean, std, 95% bootstrap CI, counts of reference-empty and false-positive cases; per dataset
the mean over tasks; overall the mean over datasets and over all tasks) and, optionally,
``report.html`` (hermes/evaluation/report.py). Conventions for empty masks are in
hermes/evaluation/metrics.py.

A task is scored only on the cases whose reference annotates it (hermes/data/annotation.py:
a sidecar ``CASE.json`` next to the reference label, a case table, or the ``absent_means``
rule). Predictions are still made for every task; an unannotated (case, task) pair is a row of
metrics.csv with ``annotated`` False and empty metrics, and each mean reports how many cases
it is over (``n_cases``, and ``n_unannotated`` for the pairs left out).
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hermes.bundle import TrainingRecord
from hermes.config import EvaluationConfig, InferenceConfig
from hermes.data.annotation import (
    annotated_values,
    entry_case_annotation,
    explicit_annotation,
    read_annotation_table,
    resolve_names,
    task_annotation,
)
from hermes.data.imageio import (
    SUPPORTED_SUFFIXES,
    Image,
    image_suffix,
    load_image,
    reorient_to_ras,
    spacing_of,
)
from hermes.errors import DataError
from hermes.evaluation.metrics import MaskScores, score_masks
from hermes.evaluation.recognition import RecognitionRecord, format_recognition, recognition_summary
from hermes.fileio import atomic_write_json, atomic_write_text, json_safe

METRICS = ("dice", "hd95", "nsd")
CSV_COLUMNS = (
    "dataset", "case", "task", "dice", "hd95", "nsd", "ref_voxels", "pred_voxels", "ref_empty", "false_positive",
    "annotated",
)  # fmt: skip
_CHANNEL = re.compile(r"^(?P<case>.+)_\d{4}$")
OVERLAY_MAX_SIDE = 256


# ----------------------------------------------------------------------------------------------
# What is scored
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoredTask:
    """One structure: the label values that make it in the reference and in the prediction
    (several values: a region, e.g. nnU-Net's region-based labels or a catalog union)."""

    name: str
    ref_values: tuple[int, ...]
    pred_values: tuple[int, ...]


@dataclass
class OverlaySlice:
    """A representative axial slice of one case for the report (small: at most 256 px a side)."""

    dataset: str
    case: str
    image: np.ndarray | None  # uint8 grey values, or None when no image was available
    ref: np.ndarray  # uint16: 0 background, i = task_names[i - 1]
    pred: np.ndarray
    aspect: float  # pixel height / width in mm
    task_names: list[str]


@dataclass
class EvaluationResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    overlays: list[OverlaySlice] = field(default_factory=list)

    def table(self) -> str:
        text = format_table(self.summary)
        if "modality_recognition" in self.summary:
            text += "\n" + format_recognition(self.summary["modality_recognition"])
        dropped = self.summary.get("dropped_channel")
        if dropped:
            each = ", ".join(f"{name}: channel {d['channel']} ({d['name']}: {d['modality']})"
                             for name, d in dropped["datasets"].items())
            text += f"\npredicted without one channel: {each}"
        return text


def read_label_file(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Foreground labels of an nnU-Net (``{"liver": 1}``, regions ``{"tumour": [1, 2]}``) or
    MSD (``{"1": "liver"}``) dataset.json, or of a Hermes prediction sidecar (same keys)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"label file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON: {error}") from None
    raw = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: needs a 'labels' mapping (nnU-Net: {{\"liver\": 1}}, MSD: {{\"1\": \"liver\"}})")
    labels: dict[str, tuple[int, ...]] = {}
    msd = all(re.fullmatch(r"\d+", str(k)) for k in raw) and all(isinstance(v, str) for v in raw.values())
    for key, value in raw.items():
        name, values = (str(value), key) if msd else (str(key), value)
        try:
            ints = tuple(int(v) for v in values) if isinstance(values, list | tuple) else (int(values),)
        except (TypeError, ValueError):
            raise DataError(f"{path}: label {name!r} has a non-integer value {values!r}") from None
        if ints == (0,) or name.lower() == "background":
            continue
        labels[name] = ints
    if not labels:
        raise DataError(f"{path}: no foreground labels")
    return labels


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1].lower()


def match_tasks(
    ref_labels: dict[str, tuple[int, ...]], pred_labels: dict[str, tuple[int, ...]] | None = None
) -> list[ScoredTask]:
    """Pair reference labels with prediction labels: same values when the prediction has no
    label file (nnU-Net's convention), else by name (exact, or the part after the last '/',
    so Hermes' ``Dataset/label`` task names match a dataset.json's ``label``)."""
    if pred_labels is None:
        return [ScoredTask(name, values, values) for name, values in ref_labels.items()]
    tasks = []
    for name, values in ref_labels.items():
        match = pred_labels.get(name)
        if match is None:
            candidates = [v for n, v in pred_labels.items() if _short(n) == _short(name)]
            if len(candidates) > 1:
                raise DataError(f"reference label {name!r} matches several prediction labels; rename them")
            match = candidates[0] if candidates else None
        if match is None:
            raise DataError(
                f"reference label {name!r} has no prediction label of that name "
                f"(prediction labels: {', '.join(pred_labels)})"
            )
        tasks.append(ScoredTask(name, values, match))
    return tasks


def case_id_of(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def case_files(folder: str | Path, strip_channel: bool = False) -> dict[str, Path]:
    """``case_id -> file`` of the image files in a folder (hidden/temporary files skipped).
    ``strip_channel`` maps nnU-Net's ``CASE_0000`` image names to ``CASE`` (channel 0 only)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not image_suffix(path):
            continue
        case = case_id_of(path)
        if strip_channel:
            match = _CHANNEL.match(case)
            if match is None or not case.endswith("_0000"):
                continue
            case = match.group("case")
        out[case] = path
    return out


# ----------------------------------------------------------------------------------------------
# Scoring one case
# ----------------------------------------------------------------------------------------------
def _integer_labels(image: Image) -> np.ndarray:
    array = image.array
    if array.ndim != 3:
        raise DataError(f"{image.path}: a label map must be 3D, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise DataError(f"{image.path}: label map has non-integer values (is it a probability map?)")
        array = rounded.astype(np.int32)
    return np.asarray(array)


def check_same_grid(pred: Image, ref: Image) -> None:
    """Predictions must be on the reference's exact grid: nothing is silently resampled."""
    if pred.array.shape[:3] != ref.array.shape[:3] or not np.allclose(pred.affine, ref.affine, atol=1e-3):
        raise DataError(
            f"{pred.path}: geometry differs from the reference {ref.path} "
            f"(shape {pred.array.shape[:3]} vs {ref.array.shape[:3]}, spacing "
            f"{tuple(round(s, 4) for s in pred.spacing)} vs {tuple(round(s, 4) for s in ref.spacing)}); "
            "predictions must be written on the reference image's grid"
        )


def score_case(
    dataset: str,
    case: str,
    masks: Iterable[tuple[str, np.ndarray, np.ndarray]],
    spacing: Sequence[float],
    config: EvaluationConfig,
    annotated: Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """Rows of metrics.csv for one case from ``(task, pred_mask, ref_mask)`` triples.

    ``annotated`` (per triple, default all True): a task the reference does not annotate
    gets a row with NaN metrics and ``annotated`` False, which no mean includes."""
    rows = []
    for index, (task, pred, ref) in enumerate(masks):
        if annotated is not None and not annotated[index]:
            ref_n, pred_n = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
            rows.append(
                {"dataset": dataset, "case": case, "task": task, "dice": math.nan, "hd95": math.nan, "nsd": math.nan,
                 "ref_voxels": ref_n, "pred_voxels": pred_n, "ref_empty": ref_n == 0, "false_positive": False,
                 "annotated": False}
            )
            continue
        scores: MaskScores = score_masks(pred, ref, spacing, config)
        rows.append({"dataset": dataset, "case": case, "task": task, **scores.as_dict(), "annotated": True})
    return rows


def _reference_annotation(
    ref: np.ndarray, ref_values: Sequence[tuple[int, ...]], explicit: Sequence[int] | None, absent_unannotated: Sequence[int]
) -> list[bool]:
    """Per scored task: does this reference annotate it (all of its label values)?"""
    foreground = sorted({v for values in ref_values for v in values})
    chosen = set(annotated_values(foreground, np.unique(ref).tolist(), explicit, absent_unannotated))
    return [set(values) <= chosen for values in ref_values]


def _index_map(label_map: np.ndarray, values_per_task: Sequence[tuple[int, ...]]) -> np.ndarray:
    out = np.zeros(label_map.shape, dtype=np.uint16)
    for index, values in enumerate(values_per_task, start=1):
        out[np.isin(label_map, values)] = index
    return out


def _to_uint8(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    scaled = (np.clip(image, lo, hi) - lo) / max(float(hi - lo), 1e-6)
    return (scaled * 255).astype(np.uint8)


def overlay_slice(
    dataset: str,
    case: str,
    ref_index: np.ndarray,
    pred_index: np.ndarray,
    affine: np.ndarray,
    image: np.ndarray | None,
    task_names: list[str],
) -> OverlaySlice:
    """The axial slice (after reorientation to RAS) with the largest reference area (else the
    largest predicted area, else the middle), in radiological display: anterior up, patient's
    right on the viewer's left."""
    ref_ras, affine_ras, _ = reorient_to_ras(ref_index, affine)
    pred_ras, _, _ = reorient_to_ras(pred_index, affine)
    area = (ref_ras > 0).sum(axis=(0, 1))
    if area.max() == 0:
        area = (pred_ras > 0).sum(axis=(0, 1))
    z = int(area.argmax()) if area.max() > 0 else ref_ras.shape[2] // 2
    sx, sy, _ = spacing_of(affine_ras)

    def display(volume: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(volume[:, :, z])[:, ::-1])

    ref2d, pred2d = display(ref_ras), display(pred_ras)
    grey = None
    if image is not None:
        image_ras, _, _ = reorient_to_ras(image, affine)
        grey = _to_uint8(display(image_ras).astype(np.float32))
    # Crop to the body (and the labels) so small structures are not lost in empty field of view.
    labelled = (ref2d > 0) | (pred2d > 0)
    keep = labelled | (grey > 12) if grey is not None else labelled
    if keep.any():
        rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
        margin = 4 if grey is not None else max(8, keep.shape[0] // 6)
        r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, keep.shape[0])
        c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, keep.shape[1])
        ref2d, pred2d = ref2d[r0:r1, c0:c1], pred2d[r0:r1, c0:c1]
        grey = grey[r0:r1, c0:c1] if grey is not None else None
    stride = max(1, math.ceil(max(ref2d.shape) / OVERLAY_MAX_SIDE))
    if stride > 1:
        ref2d, pred2d = ref2d[::stride, ::stride], pred2d[::stride, ::stride]
        grey = grey[::stride, ::stride] if grey is not None else None
    return OverlaySlice(dataset, case, grey, ref2d, pred2d, sy / sx, task_names)


@dataclass(frozen=True)
class CaseJob:
    dataset: str
    case: str
    pred_path: Path
    ref_path: Path
    image_path: Path | None
    tasks: tuple[ScoredTask, ...]
    config: EvaluationConfig
    want_overlay: bool
    explicit: tuple[int, ...] | None = None  # annotated reference values (sidecar/table), None: the rule
    absent_unannotated: tuple[int, ...] = ()
    # Label values each file may hold (0 included) and where they are declared; None: not checked.
    ref_declared: tuple[tuple[int, ...], str] | None = None
    pred_declared: tuple[tuple[int, ...], str] | None = None


def check_declared(labels: np.ndarray, path: Path, declared: tuple[tuple[int, ...], str] | None) -> None:
    """Refuse label values that the label map does not declare (they would be scored as
    background, silently): a stray value, a negative one, or a map that belongs to other files."""
    if declared is None:
        return
    values, source = declared
    allowed = sorted({*values, 0})
    found = np.unique(labels)
    undeclared = [int(v) for v in found[~np.isin(found, np.asarray(allowed))]]
    if undeclared:
        shown = ", ".join(str(v) for v in undeclared[:8]) + (" ..." if len(undeclared) > 8 else "")
        raise DataError(
            f"{path}: label value(s) {shown} not declared in {source} (declared: "
            f"{', '.join(str(v) for v in allowed)}); fix the label map, or pass "
            "--ignore-undeclared to score them as background"
        )


def run_case_job(job: CaseJob) -> tuple[list[dict[str, Any]], OverlaySlice | None]:
    """Load one prediction/reference pair and score it (top-level: runs in worker processes)."""
    ref_image = load_image(job.ref_path)
    pred_image = load_image(job.pred_path)
    check_same_grid(pred_image, ref_image)
    ref = _integer_labels(ref_image)
    pred = _integer_labels(pred_image)
    check_declared(ref, job.ref_path, job.ref_declared)
    check_declared(pred, job.pred_path, job.pred_declared)
    triples = ((t.name, np.isin(pred, t.pred_values), np.isin(ref, t.ref_values)) for t in job.tasks)
    annotated = _reference_annotation(ref, [t.ref_values for t in job.tasks], job.explicit, job.absent_unannotated)
    rows = score_case(job.dataset, job.case, triples, ref_image.spacing, job.config, annotated)
    overlay = None
    if job.want_overlay:
        image = None
        if job.image_path is not None:
            loaded = load_image(job.image_path).array
            image = loaded[..., 0] if loaded.ndim == 4 else loaded
            if image.shape != ref.shape:
                image = None  # an image on another grid cannot be overlaid; show labels only
        overlay = overlay_slice(
            job.dataset,
            job.case,
            _index_map(ref, [t.ref_values for t in job.tasks]),
            _index_map(pred, [t.pred_values for t in job.tasks]),
            ref_image.affine,
            image,
            [t.name for t in job.tasks],
        )
    return rows, overlay


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; MONAI's torch ops must not oversubscribe


def run_jobs(
    jobs: Sequence[CaseJob], workers: int, progress: bool = True
) -> Iterator[tuple[list[dict[str, Any]], OverlaySlice | None]]:
    """Score cases in worker processes.

    Forked like PyTorch's DataLoader workers (spawn would re-import the caller's ``__main__``,
    which breaks scripts without a main guard); the parent has only loaded files at this
    point, so no OpenMP thread team is inherited, and each worker uses one thread.
    """
    bar = tqdm(total=len(jobs), desc="scoring", unit="case", disable=not progress)
    try:
        if workers <= 1 or len(jobs) < 2:
            for job in jobs:
                yield run_case_job(job)
                bar.update()
            return
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_worker_init) as pool:
            for result in pool.map(run_case_job, jobs):
                yield result
                bar.update()
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------
def bootstrap_ci(
    values: Sequence[float], samples: int, rng: np.random.Generator, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean (cases resampled with replacement)."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return None
    if x.size == 1 or samples <= 0:
        return float(x.mean()), float(x.mean())
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _stats(values: Sequence[float], config: EvaluationConfig, rng: np.random.Generator) -> dict[str, Any]:
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    ci = bootstrap_ci(x, config.bootstrap_samples, rng)
    return {
        "mean": float(x.mean()) if x.size else None,
        "std": float(x.std(ddof=1)) if x.size > 1 else (0.0 if x.size else None),
        "ci95": list(ci) if ci else None,
        "n": int(x.size),
    }


def _nanmean(values: Iterable[float | None]) -> float | None:
    x = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(x)) if x else None


def summarize(rows: Sequence[dict[str, Any]], config: EvaluationConfig | None = None) -> dict[str, Any]:
    """Per dataset and task statistics; dataset means over tasks; overall means."""
    config = config or EvaluationConfig()
    rng = np.random.default_rng(config.seed)
    by_dataset: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_dataset[row["dataset"]][row["task"]].append(row)
    datasets: dict[str, Any] = {}
    for dataset, tasks in by_dataset.items():
        task_stats: dict[str, Any] = {}
        for task, all_rows in tasks.items():
            task_rows = [r for r in all_rows if r.get("annotated", True)]
            entry: dict[str, Any] = {
                "n_cases": len(task_rows),
                "n_unannotated": len(all_rows) - len(task_rows),
                "n_ref_empty": sum(bool(r["ref_empty"]) for r in task_rows),
                "n_false_positive": sum(bool(r["false_positive"]) for r in task_rows),
            }
            for metric in METRICS:
                entry[metric] = _stats([float(r[metric]) for r in task_rows], config, rng)
            task_stats[task] = entry
        # Dataset level: the mean over tasks (the paper's per-dataset score); its CI resamples
        # cases, each case contributing its mean over the tasks it could be scored on.
        per_case: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for task_rows in tasks.values():
            for r in task_rows:
                if not r.get("annotated", True):
                    continue
                for metric in METRICS:
                    per_case[metric][r["case"]].append(float(r[metric]))
        mean: dict[str, Any] = {}
        for metric in METRICS:
            case_means = [m for m in (_nanmean(v) for v in per_case[metric].values()) if m is not None]
            ci = bootstrap_ci(case_means, config.bootstrap_samples, rng)
            mean[metric] = {
                "mean": _nanmean(task_stats[t][metric]["mean"] for t in task_stats),
                "ci95": list(ci) if ci else None,
            }
        datasets[dataset] = {
            "n_cases": len({r["case"] for task_rows in tasks.values() for r in task_rows if r.get("annotated", True)}),
            "tasks": task_stats,
            "mean": mean,
        }
    overall = {
        "mean_over_datasets": {m: _nanmean(d["mean"][m]["mean"] for d in datasets.values()) for m in METRICS},
        "mean_over_tasks": {
            m: _nanmean(t[m]["mean"] for d in datasets.values() for t in d["tasks"].values()) for m in METRICS
        },
    }
    return {
        "conventions": {
            "nsd_tolerance_mm": config.nsd_tolerance_mm,
            "hd_percentile": config.hd_percentile,
            "both_empty": "Dice/NSD/HD95 NaN, excluded from means (counted in n_ref_empty)",
            "one_empty": "Dice 0, NSD 0, HD95 = image diagonal in mm",
            "ci": f"95% percentile bootstrap over cases, {config.bootstrap_samples} resamples, seed {config.seed}",
            "dataset_mean": "mean over the dataset's tasks of the per-task means",
            "unannotated": "a (case, task) pair whose reference does not annotate the task (sidecar, table or "
            "absent_means rule) is not scored; n_cases counts the annotated cases, n_unannotated the others",
            "overall": "mean_over_datasets weights datasets equally; mean_over_tasks weights tasks equally",
        },
        "datasets": datasets,
        "overall": overall,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text table: one line per task, one mean line per dataset, the overall means."""
    header = f"{'dataset / task':<44} {'n':>4} {'Dice':>6} {'95% CI':>15} {'NSD':>6} {'HD95mm':>8} {'FP/empty':>9}"
    lines = [header, "-" * len(header)]
    for dataset, entry in summary["datasets"].items():
        for task, stats in entry["tasks"].items():
            ci = stats["dice"]["ci95"]
            ci_text = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"
            label = task[len(dataset) + 1 :] if task.startswith(dataset + "/") else task
            label = label if len(label) <= 42 else "..." + label[-39:]
            lines.append(
                f"  {label:<42} {stats['dice']['n']:>4} {_fmt(stats['dice']['mean']):>6} {ci_text:>15} "
                f"{_fmt(stats['nsd']['mean']):>6} {_fmt(stats['hd95']['mean'], 2):>8} "
                f"{stats['n_false_positive']:>4}/{stats['n_ref_empty']:<4}"
            )
        mean = entry["mean"]
        ci = mean["dice"]["ci95"]
        ci_text = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"
        name = dataset if len(dataset) <= 36 else dataset[:33] + "..."
        lines.append(
            f"{name + ' (mean)':<44} {entry['n_cases']:>4} {_fmt(mean['dice']['mean']):>6} {ci_text:>15} "
            f"{_fmt(mean['nsd']['mean']):>6} {_fmt(mean['hd95']['mean'], 2):>8}"
        )
    overall = summary["overall"]["mean_over_datasets"]
    lines.append("-" * len(header))
    lines.append(
        f"{'overall (mean over datasets)':<44} {'':>4} {_fmt(overall['dice']):>6} {'':>15} "
        f"{_fmt(overall['nsd']):>6} {_fmt(overall['hd95'], 2):>8}"
    )
    skipped = [
        f"{task} {stats['n_unannotated']}"
        for entry in summary["datasets"].values()
        for task, stats in entry["tasks"].items()
        if stats.get("n_unannotated")
    ]
    if skipped:
        lines.append(f"n: cases scored; not scored where the reference does not annotate the task: {', '.join(skipped)}")
    return "\n".join(lines)


RESULT_FILES = ("metrics.csv", "summary.json", "report.html", "predictions")


def check_results_absent(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace the results of an earlier evaluation in ``output_dir``."""
    if overwrite:
        return
    existing = [name for name in RESULT_FILES if (Path(output_dir) / name).exists()]
    if existing:
        raise DataError(
            f"{output_dir}: holds results of an earlier evaluation ({', '.join(existing)}); "
            "pass --overwrite to replace them, or choose another -o folder"
        )


def write_outputs(
    result: EvaluationResult, output_dir: str | Path, report: bool = False, title: str = "", report_cases: int = 3
) -> Path:
    """metrics.csv + summary.json (+ report.html) into ``output_dir``, each written atomically."""
    output_dir = Path(output_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write_text(output_dir / "metrics.csv", buffer.getvalue())
    atomic_write_json(output_dir / "summary.json", json_safe(result.summary))
    if report:
        from hermes.evaluation.report import write_report

        write_report(output_dir / "report.html", result, title=title or "Hermes evaluation", report_cases=report_cases)
    return output_dir


# ----------------------------------------------------------------------------------------------
# (a) folders
# ----------------------------------------------------------------------------------------------
def _guess_image_dir(ref_dir: Path) -> Path | None:
    """nnU-Net layout: labelsTs -> imagesTs, labelsTr -> imagesTr."""
    name = ref_dir.name
    if name.startswith("labels"):
        candidate = ref_dir.with_name("images" + name[len("labels") :])
        if candidate.is_dir():
            return candidate
    return None


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: str | Path | dict[str, tuple[int, ...]] | None = None,
    pred_labels: str | Path | dict[str, tuple[int, ...]] | None = None,
    dataset: str | None = None,
    images_dir: str | Path | None = None,
    config: EvaluationConfig | None = None,
    overlays: bool = False,
    progress: bool = True,
    annotations: str | Path | None = None,
    absent_means: str | dict[str, str] | None = None,
    case_label_maps: bool = True,
    ignore_undeclared: bool = False,
) -> EvaluationResult:
    """Score every reference case against the prediction file of the same case id.

    Args:
        labels: the reference dataset.json (or a name -> values mapping); default: the
            dataset.json next to ``ref_dir`` (nnU-Net: ``labelsTs/../dataset.json``), else every
            non-zero value found in the references, named by its value.
        pred_labels: label names -> values of the predictions when they differ from the
            reference's (matched by name); default: the same values as the reference.
        dataset: name used in the tables; default the folder holding ``ref_dir``.
        annotations: a case table (TSV: ``case``, ``annotated``) of the labels each reference
            annotates; a sidecar ``REF_DIR/CASE.json`` takes precedence (annotation.py).
        absent_means: ``unannotated`` / ``background`` for every label, or ``{label: rule}``:
            what a label absent from a reference without a sidecar or table row means.
        case_label_maps: a prediction's own ``CASE.json`` (``hermes predict`` writes one next to
            each output) gives its label names, before ``pred_labels``: a folder-level map can
            be stale when predictions of several runs share the folder.
        ignore_undeclared: score label values that no label map declares as background instead
            of refusing them.
    """
    config = config or EvaluationConfig()
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    refs = case_files(ref_dir)
    preds = case_files(pred_dir)
    if not refs:
        raise DataError(f"{ref_dir}: no reference label files ({', '.join(SUPPORTED_SUFFIXES)})")
    missing = sorted(set(refs) - set(preds))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{pred_dir}: no prediction for reference case(s) {shown}")
    if labels is None and (ref_dir.parent / "dataset.json").is_file():
        labels = ref_dir.parent / "dataset.json"
    ref_source = "the label map given"
    if labels is None:
        values: set[int] = set()
        for path in refs.values():
            values.update(int(v) for v in np.unique(_integer_labels(load_image(path))) if v != 0)
        ref_labels = {f"label_{v}": (v,) for v in sorted(values)}
        if not ref_labels:
            raise DataError(f"{ref_dir}: the references contain no foreground; pass --labels")
    else:
        ref_labels = labels if isinstance(labels, dict) else read_label_file(labels)
        ref_source = ref_source if isinstance(labels, dict) else str(labels)
    pred_map = pred_labels if isinstance(pred_labels, dict) or pred_labels is None else read_label_file(pred_labels)
    pred_source = "the reference's label map" if pred_map is None else (
        str(pred_labels) if not isinstance(pred_labels, dict) else "the prediction label map given"
    )
    name = dataset or (ref_dir.parent.name if ref_dir.name.startswith("labels") else ref_dir.name)
    image_dir = Path(images_dir) if images_dir else _guess_image_dir(ref_dir)
    images = case_files(image_dir, strip_channel=True) if (overlays and image_dir) else {}
    rule = _absent_rule(absent_means, ref_labels)
    table = read_annotation_table(Path(annotations), ref_labels, [name]) if annotations is not None else None

    def declared(label_map: dict[str, tuple[int, ...]], source: str) -> tuple[tuple[int, ...], str] | None:
        return None if ignore_undeclared else (tuple(sorted({v for vs in label_map.values() for v in vs})), source)

    jobs = []
    for case, ref_path in refs.items():
        explicit = explicit_annotation(case, ref_path, ref_labels, table, str(annotations)).explicit
        case_map, case_source = pred_map, pred_source
        sidecar = preds[case].with_name(f"{case}.json")
        if case_label_maps and sidecar.is_file():
            case_map, case_source = read_label_file(sidecar), str(sidecar)
        tasks = tuple(match_tasks(ref_labels, case_map))
        jobs.append(
            CaseJob(name, case, preds[case], ref_path, images.get(case), tasks, config, overlays,
                    explicit=explicit, absent_unannotated=rule,
                    ref_declared=declared(ref_labels, ref_source),
                    pred_declared=declared(case_map or ref_labels, case_source))
        )
    rows: list[dict[str, Any]] = []
    slices: list[OverlaySlice] = []
    for case_rows, overlay in run_jobs(jobs, config.workers, progress):
        rows.extend(case_rows)
        if overlay is not None:
            slices.append(overlay)
    return EvaluationResult(rows, summarize(rows, config), slices)


def _absent_rule(absent_means: str | dict[str, str] | None, labels: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Reference label values whose absence means "not annotated"."""
    rules = {"background", "unannotated"}
    if absent_means is None:
        return ()
    if isinstance(absent_means, str):
        if absent_means not in rules:
            raise DataError(f"absent_means: {absent_means!r} must be 'background' or 'unannotated'")
        return tuple(sorted({v for vs in labels.values() for v in vs})) if absent_means == "unannotated" else ()
    values: set[int] = set()
    for name, rule in absent_means.items():
        if rule not in rules:
            raise DataError(f"absent_means.{name}: {rule!r} must be 'background' or 'unannotated'")
        if rule == "unannotated":
            values |= resolve_names([name], labels, f"absent_means.{name}")
    return tuple(sorted(values))


# ----------------------------------------------------------------------------------------------
# (b) a model on a catalog's cases
# ----------------------------------------------------------------------------------------------
def _model_dataset(predictor: Any, name: str) -> str | None:
    """The oracle prompt: the dataset itself when the model was trained on it (else the tasks
    are grouped by the datasets that trained them, e.g. for a test-only dataset)."""
    return name if any(entry.name == name for entry in predictor.catalog.datasets) else None


def validation_case_ids(training: TrainingRecord | None, dataset: str, train_ids: Sequence[str]) -> list[str]:
    """The cases ``hermes train`` held out of ``dataset`` for validation: as recorded in the
    model's training record (``training.validation_cases``), else the trainer's seeded split of
    the dataset's training cases redone from the recorded config (``data.val_fraction``,
    ``val_min_cases``, ``seed``; equal unless the cache skipped cases)."""
    from hermes.data.sampling import split_cases

    recorded = training.validation_cases if training is not None else None
    if recorded is not None:
        return [str(c) for c in recorded.get(dataset, [])]
    config = training.config if training is not None else None
    if config is None:
        raise DataError("the model's training record holds neither validation cases nor its training config")
    data = config.get("data") or {}
    _, val = split_cases(
        {dataset: list(train_ids)}, float(data.get("val_fraction", 0.1)), int(data.get("val_min_cases", 1)),
        int(config.get("seed", 0)),
    )
    return val[dataset]


def evaluate_model(
    model_dir: str | Path,
    catalog_path: str | Path | None = None,
    split: str = "test",
    datasets: Sequence[str] | None = None,
    inference: InferenceConfig | None = None,
    config: EvaluationConfig | None = None,
    device: str | None = None,
    detect_modality: bool = False,
    overlays: bool = False,
    save_predictions: str | Path | None = None,
    progress: bool = True,
    max_cases: int | None = None,
    ignore_undeclared: bool = False,
    inspect: Callable[[str, str, list[tuple[str, np.ndarray, np.ndarray]]], None] | None = None,
    drop_channel: str | int | None = None,
) -> EvaluationResult:
    """Predict each selected dataset's ``split`` cases and score them per task.

    ``split``: ``test``, ``train``, ``all``, or ``val`` (the training cases the model held out for
    validation, :func:`validation_case_ids`). ``inspect(dataset, case, [(task, pred, ref)])`` is
    called per case with the scored masks (the postprocessing choice measures its variants there).

    The prompt is the dataset's own tasks and modality (the paper's oracle protocol) unless
    ``detect_modality``, which lets the modality head choose; each case is then predicted a
    second time with its given modality, and ``summary["modality_recognition"]``
    (hermes/evaluation/recognition.py) holds the confusion matrix and the Dice with inferred
    vs given modality on the same cases. Scores are computed on each
    case's native grid against ``isin(label, label_values_of_task)``. With the default
    multi-label output, overlapping task masks are resolved as ``hermes predict`` does (the
    most probable task wins), which is what a user of the written files gets; pass
    ``inference.output="binary"`` to score every task's own sigmoid mask instead (nested
    region tasks need that). Every task is predicted; a task is scored only on the cases whose
    reference annotates it (the catalog's sidecars, table and ``absent_means`` rule).
    A reference value that the dataset's labels do not declare is an error unless
    ``ignore_undeclared``.

    ``drop_channel`` (a channel number, dataset.json channel name or modality, e.g. ``T1c``):
    every case is predicted without that channel of its dataset, through the missing-channel
    path of ``hermes predict`` (hermes/inference/channels.py): the Dice with one channel
    missing. It needs a model that fuses channels (``model.channel_fusion: mean``), and every
    selected dataset must have the channel and at least one other (``datasets`` selects them).
    One :class:`MissingChannelWarning` per dataset names the channel (not one per case), and
    ``summary["dropped_channel"]`` records it.
    """
    from hermes.data.catalog import load_catalog
    from hermes.data.readers import open_dataset
    from hermes.inference.channels import MissingChannelWarning, without_channel
    from hermes.inference.predictor import Predictor, dataset_catalog

    config = config or EvaluationConfig()
    inference = inference or InferenceConfig()
    predictor = Predictor(model_dir, device=device, config=inference)
    if catalog_path is not None:
        catalog = load_catalog(catalog_path)
    elif predictor.bundle.catalog is not None:
        catalog = predictor.catalog  # serialised with dataset paths (adaptation output)
    else:
        catalog = dataset_catalog(predictor.model_dir)  # catalog.yaml: needs the dataset folders
    entries = list(catalog.datasets)
    if datasets:
        wanted = {d.lower() for d in datasets}
        known = [e.name for e in entries]
        unknown = sorted(w for w in wanted if w not in {k.lower() for k in known})
        if unknown:
            raise DataError(f"unknown dataset(s) {', '.join(unknown)}; the catalog has: {', '.join(known)}")
        entries = [e for e in entries if e.name.lower() in wanted]
    if split not in ("test", "train", "all", "val"):
        raise DataError(f"unknown split {split!r} (test, train, all or val)")
    dropped = _dropped_channels(predictor, entries, drop_channel) if drop_channel is not None else {}

    task_names = {task.index: task.name for task in catalog.tasks}
    rows: list[dict[str, Any]] = []
    given_rows: list[dict[str, Any]] = []  # detect_modality: the same cases with the given modality
    recognition: list[RecognitionRecord] = []
    slices: list[OverlaySlice] = []
    for entry in entries:
        info = open_dataset(entry.path)
        if split == "val":
            held = set(validation_case_ids(predictor.bundle.training, entry.name, [c.case_id for c in info.train_cases()]))
            cases = [c for c in info.train_cases() if c.label_path is not None and c.case_id in held]
        else:
            cases = [c for c in info.cases if c.label_path is not None and (split == "all" or c.split == split)]
        if max_cases is not None:
            cases = cases[:max_cases]
        tasks = [task_names[t] for t in entry.task_ids]
        values = [tuple(int(v) for v in vs) for vs in entry.label_values]
        if entry.name in dropped and cases:
            warnings.warn(
                f"{entry.name}: evaluating without {dropped[entry.name]['described']}; each case is predicted from "
                f"the other {entry.num_channels - 1} channel(s)",
                MissingChannelWarning,
                stacklevel=2,
            )
        for case in tqdm(cases, desc=entry.name, unit="case", disable=not progress):
            image = predictor.load_case(case.image_paths)
            if entry.name in dropped:
                image = without_channel(image, dropped[entry.name]["channel"])
            ref_image = load_image(case.label_path)  # type: ignore[arg-type]
            ref = _integer_labels(ref_image)
            if not ignore_undeclared:  # what `hermes prepare` refuses too
                check_declared(ref, case.label_path, (tuple(entry.labels.values()), f"{entry.path}/dataset.json"))  # type: ignore[arg-type]
            with warnings.catch_warnings():
                if entry.name in dropped:  # warned once for the dataset above
                    warnings.simplefilter("ignore", MissingChannelWarning)
                prediction = predictor.predict(
                    image,
                    tasks=tasks,
                    modality=None if detect_modality else entry.modality,
                    progress=False,
                    dataset=None if detect_modality else _model_dataset(predictor, entry.name),
                )
            if entry.name in dropped and not prediction.extra.get("missing_channels"):
                raise DataError(f"{case.case_id}: predicted without a missing channel although one was dropped")
            if ref.shape != prediction.shape or not np.allclose(ref_image.affine, prediction.affine, atol=1e-3):
                raise DataError(f"{case.label_path}: label grid differs from its image {case.image_paths[0]}")
            masks: list[tuple[str, np.ndarray, np.ndarray]] = [
                (task, prediction.mask(task), np.isin(ref, vals)) for task, vals in zip(tasks, values)
            ]
            explicit = entry_case_annotation(entry, case.case_id, case.label_path).explicit
            foreground = [v for v in entry.labels.values() if v != 0]
            chosen = annotated_values(foreground, np.unique(ref).tolist(), explicit, entry.absent_unannotated)
            annotated = task_annotation(entry, chosen)
            rows.extend(score_case(entry.name, case.case_id, masks, ref_image.spacing, config, annotated))
            if detect_modality:
                raw = prediction.extra.get("modality_scores", {}).get(prediction.modality)  # uncapped softmax
                recognition.append(RecognitionRecord(entry.name, case.case_id, entry.modality, prediction.modality,
                                                     prediction.modality_probability if raw is None else raw))
                with warnings.catch_warnings():
                    if entry.name in dropped:
                        warnings.simplefilter("ignore", MissingChannelWarning)
                    given = predictor.predict(image, tasks=tasks, modality=entry.modality, progress=False,
                                              dataset=_model_dataset(predictor, entry.name))
                given_masks = [(task, given.mask(task), ref_mask) for (task, _, ref_mask) in masks]
                given_rows.extend(score_case(entry.name, case.case_id, given_masks, ref_image.spacing, config,
                                             annotated))
            if inspect is not None:  # postprocessing decisions: only pairs the reference annotates
                inspect(entry.name, case.case_id, [mask for mask, ok in zip(masks, annotated) if ok])
            if save_predictions is not None:
                prediction.save(Path(save_predictions) / entry.name / f"{case.case_id}.nii.gz", overwrite=True)
            if overlays:
                pred_index = np.zeros(ref.shape, dtype=np.uint16)
                for index, (_, pred_mask, _) in enumerate(masks, start=1):
                    pred_index[pred_mask] = index
                grey = image.array[..., 0] if image.array.ndim == 4 else image.array
                slices.append(
                    overlay_slice(entry.name, case.case_id, _index_map(ref, values), pred_index,
                                  ref_image.affine, grey, tasks)
                )
    if not rows:
        raise DataError(f"no labelled {split} cases in the selected datasets of {catalog_path or model_dir}")
    summary = summarize(rows, config)
    if detect_modality:
        summary["modality_recognition"] = recognition_summary(recognition, summarize(given_rows, config), summary)
    if drop_channel is not None:
        summary["dropped_channel"] = {
            "requested": str(drop_channel),
            "datasets": {name: {k: v for k, v in info.items() if k != "described"} for name, info in dropped.items()},
        }
    return EvaluationResult(rows, summary, slices)


def _dropped_channels(predictor: Any, entries: Sequence[Any], channel: str | int) -> dict[str, dict[str, Any]]:
    """Per selected dataset: the number, name and modality of the channel ``channel`` names
    (checked before any prediction: a model that needs every channel, or a dataset without
    the channel or without another one, is an error)."""
    from hermes.errors import ConfigError
    from hermes.inference.channels import describe_missing, resolve_channel
    from hermes.models.channel_stem import reads_channels

    if not reads_channels(predictor.model):
        raise ConfigError(
            f"drop channel {channel!r}: this model's first convolution reads every channel (model.channel_fusion: "
            "none), so it cannot predict without one; only a model trained with channel_fusion: mean can"
        )
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.num_channels < 2:
            raise DataError(
                f"drop channel {channel!r}: dataset {entry.name!r} has one channel, which would leave nothing; "
                "select the multi-channel datasets (--datasets)"
            )
        number = resolve_channel(entry, channel)
        out[entry.name] = {
            "channel": number,
            "name": entry.channel_names[number],
            "modality": entry.channel_modalities[number],
            "described": describe_missing([n != number for n in range(entry.num_channels)], entry),
        }
    return out

