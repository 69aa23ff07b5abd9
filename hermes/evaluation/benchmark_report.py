"""Tables and paired comparisons of ``hermes benchmark`` runs (no training here).

Everything is rebuilt from the ``result.json`` files under ``WORK/runs``, so several
invocations (other seeds, other models, other processes) feed one table, and the tables can be
rewritten without training anything.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hermes.errors import ConfigError
from hermes.evaluation.paired import paired_difference
from hermes.fileio import atomic_write_json

METRICS = ("dice", "hd95", "nsd")
RESULT_FILE = "result.json"


def collect(work: Path) -> list[dict[str, Any]]:
    """Every finished run under WORK (also those of other invocations and processes)."""
    return [json.loads(p.read_text()) for p in sorted((work / "runs").glob(f"*/*/seed*/{RESULT_FILE}"))]


def _ms(values: Sequence[float], digits: int = 1) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
def aggregate(results: Sequence[Mapping[str, Any]], datasets: Sequence[str], models: Sequence[str]) -> dict[str, Any]:
    """Per model: per metric and dataset the value of every seed, per seed the mean over
    datasets (only seeds with every dataset scored), and per task the value of every seed."""
    table: dict[str, Any] = {}
    for key in models:
        runs = [r for r in results if r["model"] == key]
        if not runs:
            continue
        seeds = sorted({int(r["seed"]) for r in runs})
        per_metric: dict[str, Any] = {}
        for metric in METRICS:
            cells: dict[str, dict[int, float]] = {d: {} for d in datasets}
            tasks: dict[str, dict[int, float]] = {}
            for r in runs:
                for name, entry in r["datasets"].items():
                    if name not in cells:
                        continue
                    if entry.get(metric) is not None:
                        cells[name][int(r["seed"])] = float(entry[metric])
                    for task, stats in entry.get("tasks", {}).items():
                        if stats.get(metric) is not None:
                            tasks.setdefault(task, {})[int(r["seed"])] = float(stats[metric])
            means = {
                s: float(np.mean([cells[d][s] for d in datasets])) for s in seeds if all(s in cells[d] for d in datasets)
            }
            per_metric[metric] = {
                "cells": {d: {str(s): v for s, v in c.items()} for d, c in cells.items()},
                "mean_over_datasets": {str(s): v for s, v in means.items()},
                "tasks": {t: {str(s): v for s, v in c.items()} for t, c in tasks.items()},
            }
        table[key] = {
            "label": runs[0]["label"],
            "paradigm": runs[0]["paradigm"],
            "seeds": seeds,
            "steps": sorted({int(r["steps"]) for r in runs}),
            "final_weights": sorted({str(r.get("final_weights")) for r in runs}),
            "metrics": per_metric,
            "train_wall_s": sum(float(r.get("train_wall_s") or 0.0) for r in runs),
            "eval_wall_s": sum(float(r.get("eval_wall_s") or 0.0) for r in runs),
            "runs": len(runs),
        }
    return table


def rows_by_seed(results: Sequence[Mapping[str, Any]], model: str, datasets: Sequence[str]) -> dict[int, list[dict[str, Any]]]:
    """Per-case rows of one model, per seed, for the seeds that scored every dataset (a
    traditional model's seed gathers its per-dataset runs)."""
    rows: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        if r["model"] == model:
            rows.setdefault(int(r["seed"]), []).extend(c for c in r["cases"] if c["dataset"] in datasets)
    return {s: v for s, v in rows.items() if {c["dataset"] for c in v} >= set(datasets)}


def compare(
    results: Sequence[Mapping[str, Any]],
    datasets: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    meta: Mapping[str, Any],
    samples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Paired Dice differences (points) for every pair whose models share a complete seed."""
    out: list[dict[str, Any]] = []
    for a, b in pairs:
        rows_a, rows_b = rows_by_seed(results, a, datasets), rows_by_seed(results, b, datasets)
        if not set(rows_a) & set(rows_b):
            continue
        diff = paired_difference(rows_a, rows_b, datasets, "dice", samples=samples, seed=seed)
        entry = {
            "data": meta["data_name"],
            "budget_rule": meta["budget_rule"],
            "a": a,
            "b": b,
            "metric": "dice (points, 0-100)",
            "steps_per_dataset": meta["steps"],
            "universal_steps": meta["universal_steps"],
            **diff.to_dict(),
        }
        entry["mean_diff"] = round(entry["mean_diff"], 3)
        entry["ci95"] = [round(v, 3) for v in entry["ci95"]]
        entry["per_dataset"] = {k: round(v, 3) for k, v in entry["per_dataset"].items()}
        entry["per_dataset_ci95"] = {k: [round(x, 3) for x in v] for k, v in entry["per_dataset_ci95"].items()}
        entry["per_seed"] = {k: round(v, 3) for k, v in entry["per_seed"].items()}
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
_SCALE = {"dice": (100.0, "Dice (%)"), "nsd": (100.0, "NSD (%, {tol:g} mm)"), "hd95": (1.0, "HD95 (mm)")}


def budget_text(meta: Mapping[str, Any]) -> str:
    steps, n = meta["steps"], meta["n_train_datasets"]
    common = f"(batch {meta['batch']}, patch {meta['patch']}, model preset `{meta['model_preset']}`)"
    if meta["budget_rule"] == "equal_total_compute":
        return (
            f"Budget rule **equal total compute**: each per-dataset (traditional) model trains {steps} steps, "
            f"each universal model {n} x {steps} = {n * steps} steps ({n} training datasets) {common}, so the "
            f"{n} per-dataset models together and one universal model get the same number of optimiser steps."
        )
    return (
        f"Budget rule **equal steps**: every model trains {steps} steps {common}, so the {n} per-dataset "
        f"models together get {n}x the universal model's compute."
    )


def markdown(table: Mapping[str, Any], datasets: Sequence[str], meta: Mapping[str, Any],
             comparisons: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"### {meta['title']}", "", budget_text(meta), ""]
    lines.append(
        f"Recipe: {meta['recipe_text']}. Validation hold-out: `data.val_fraction` {meta['val_fraction']} of each "
        f"dataset's training cases (same split for both paradigms). Test cases: {meta['test_cases']}. Cells: mean "
        "± std over seeds (one number: one seed); the mean column is the mean over datasets per seed, then over "
        "seeds (only seeds with every dataset scored)."
    )
    lines.append("")
    for metric in ("dice", "nsd", "hd95"):
        factor, title = _SCALE[metric]
        lines.append(f"**{title.format(tol=meta['nsd_tolerance_mm'])}**" + (" (lower is better)" if metric == "hd95" else ""))
        lines.append("")
        lines.append("| Model | Paradigm | steps | seeds | " + " | ".join(datasets) + " | Mean |")
        lines.append("|---|---|---|---|" + "---|" * (len(datasets) + 1))
        for entry in table.values():
            m = entry["metrics"][metric]
            cells = [_ms([v * factor for v in m["cells"][d].values()]) for d in datasets]
            mean = _ms([v * factor for v in m["mean_over_datasets"].values()])
            steps = ",".join(str(s) for s in entry["steps"])
            seeds = ",".join(str(s) for s in entry["seeds"])
            lines.append(f"| {entry['label']} | {entry['paradigm']} | {steps} | {seeds} | " + " | ".join(cells) + f" | {mean} |")
        lines.append("")
    for metric in ("dice", "nsd", "hd95"):
        lines.extend(_task_table(table, datasets, metric, meta))
    lines.extend(_comparison_lines(comparisons, table))
    lines.append("**Runs** (wall time on this machine: all seeds and, for traditional rows, all datasets)")
    lines.append("")
    lines.append("| Model | Paradigm | runs | saved weights | train (min) | evaluate (min) |")
    lines.append("|---|---|---|---|---|---|")
    for entry in table.values():
        lines.append(
            f"| {entry['label']} | {entry['paradigm']} | {entry['runs']} | {', '.join(entry['final_weights'])} | "
            f"{entry['train_wall_s'] / 60:.1f} | {entry['eval_wall_s'] / 60:.1f} |"
        )
    lines.extend(["", f"Command: `{meta['command']}`", ""])
    return "\n".join(lines)


def _task_table(table: Mapping[str, Any], datasets: Sequence[str], metric: str, meta: Mapping[str, Any]) -> list[str]:
    factor, title = _SCALE[metric]
    tasks = sorted(
        {t for entry in table.values() for t in entry["metrics"][metric]["tasks"]},
        key=lambda t: (datasets.index(t.split("/")[0]) if t.split("/")[0] in datasets else len(datasets), t),
    )
    if not tasks:
        return []
    keys = list(table)
    lines = [f"**{title.format(tol=meta['nsd_tolerance_mm'])} per task** (mean ± std over seeds)", ""]
    lines.append("| Task | " + " | ".join(table[k]["label"] for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for task in tasks:
        row = [_ms([v * factor for v in table[k]["metrics"][metric]["tasks"].get(task, {}).values()]) for k in keys]
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _comparison_lines(comparisons: Sequence[Mapping[str, Any]], table: Mapping[str, Any]) -> list[str]:
    if not comparisons:
        return []
    datasets = list(comparisons[0]["per_dataset"])
    lines = [
        "**Paired Dice differences** (a minus b, Dice points; 95 % CI: percentile bootstrap over test cases, "
        "resampled with replacement within each dataset, the same case ids for both models and every seed, "
        "per-seed differences averaged; seeds themselves are not resampled, their spread is the per-seed column)",
        "",
        "| a - b | seeds | Mean [95 % CI] | " + " | ".join(datasets) + " | per seed |",
        "|---|---|---|" + "---|" * (len(datasets) + 1),
    ]
    for c in comparisons:
        label = f"{table[c['a']]['label']} - {table[c['b']]['label']}"
        cells = [
            f"{c['per_dataset'][d]:+.1f} [{c['per_dataset_ci95'][d][0]:+.1f}, {c['per_dataset_ci95'][d][1]:+.1f}]"
            for d in datasets
        ]
        per_seed = ", ".join(f"{v:+.1f}" for v in c["per_seed"].values())
        lines.append(
            f"| {label} | {','.join(map(str, c['seeds']))} | {c['mean_diff']:+.1f} [{c['ci95'][0]:+.1f}, "
            f"{c['ci95'][1]:+.1f}] | " + " | ".join(cells) + f" | {per_seed} |"
        )
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------------
# summary.json and --summary-into
# --------------------------------------------------------------------------------------------
def _comparison_key(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """Budgets are kept apart: an S = 1,200 comparison does not replace the S = 600 one."""
    return tuple(str(entry.get(k)) for k in ("data", "budget_rule", "steps_per_dataset", "a", "b"))


def merge_summary(path: Path, comparisons: Sequence[Mapping[str, Any]]) -> Path:
    """Merge ``comparisons`` into the ``{"comparisons": [...]}`` file at ``path`` (created if
    missing): an entry with the same data, budget rule, steps per dataset, a and b is replaced,
    others are kept in their order; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two benchmarks (e.g. synthetic and realmini) may merge into one file at the same time: the
    # read-modify-write holds a lock on the folder (the file itself is replaced, so it cannot
    # carry the lock; a lock file would litter docs/).
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        return _merge(path, comparisons)
    finally:
        os.close(folder)  # releases the lock


def read_summary(path: Path) -> dict[str, Any]:
    """The summary file at ``path`` (``{"comparisons": []}`` when missing); checked at the start
    of a benchmark too, so a bad file is reported before hours of training, not after."""
    if not path.exists():
        return {"comparisons": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--summary-into {path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("comparisons"), list):
        raise ConfigError(f"--summary-into {path}: expected an object with a list under \"comparisons\"")
    return data


def _merge(path: Path, comparisons: Sequence[Mapping[str, Any]]) -> Path:
    data = read_summary(path)
    existing = list(data["comparisons"])
    other = {k: v for k, v in data.items() if k != "comparisons"}
    new = {_comparison_key(c): dict(c) for c in comparisons}
    merged = [new.pop(_comparison_key(c)) if _comparison_key(c) in new else c for c in existing]
    merged.extend(new.values())
    atomic_write_json(path, {**other, "comparisons": merged})
    return path
