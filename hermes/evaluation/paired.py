"""Paired difference of two models' Dice with a case bootstrap (used by ``hermes benchmark``).

Two models ``a`` and ``b`` were scored on the same test cases, once per training seed. The
quantity compared is the table's own score: per dataset, the mean over the dataset's tasks of
the per-task mean over cases (NaN scores, i.e. reference and prediction both empty, left out,
as in :func:`hermes.evaluation.evaluate.summarize`); overall, the mean over datasets.

    diff(dataset) = mean over seeds of [score_a(seed, dataset) - score_b(seed, dataset)]
    diff(overall) = mean over datasets of diff(dataset)

The 95 % interval is a percentile bootstrap that resamples **test cases**, with replacement,
within each dataset (a stratified bootstrap: every replicate keeps each dataset's number of
cases). One resample of case ids is drawn per dataset and replicate and applied to both models
and to every seed: the pairing is by case id, so the case-to-case spread that both models share
(easy and hard cases) cancels, and only the disagreement between the models varies. Seeds are
not resampled: each replicate averages the per-seed differences, so the interval states how
much the result depends on which test cases were drawn, for these trained models; the seed
spread is reported separately (``per_seed``).

With ``resample_seeds=True`` each replicate also draws the seeds with replacement (once per
replicate, shared by all datasets: a seed is one pair of trained models) and averages the
per-seed differences with those counts. The interval then also covers training-seed variation
(a two-level bootstrap: seeds, then cases). With few seeds it is coarse: 3 seeds give only 10
distinct seed multisets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hermes.errors import DataError

# seed -> rows of one evaluation: {"dataset", "case", "task", metric: value}
Rows = Sequence[Mapping[str, Any]]


@dataclass
class PairedDifference:
    """``a`` minus ``b`` in the scale given (Dice points 0-100 by default)."""

    mean_diff: float
    ci95: tuple[float, float]
    per_dataset: dict[str, float]
    per_dataset_ci95: dict[str, tuple[float, float]]
    per_seed: dict[int, float]  # overall difference of each seed alone (no resampling)
    n_cases: dict[str, int]
    seeds: list[int]
    samples: int
    resampled: str = field(
        default="test cases with replacement within each dataset; the same case ids for both "
        "models and all seeds; per-seed differences averaged, seeds not resampled"
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_diff": self.mean_diff,
            "ci95": list(self.ci95),
            "per_dataset": self.per_dataset,
            "per_dataset_ci95": {k: list(v) for k, v in self.per_dataset_ci95.items()},
            "per_seed": {str(k): v for k, v in self.per_seed.items()},
            "n_cases": self.n_cases,
            "seeds": self.seeds,
            "bootstrap_samples": self.samples,
            "resampled": self.resampled,
        }


def _matrix(rows: Rows, dataset: str, cases: Sequence[str], tasks: Sequence[str], metric: str) -> np.ndarray:
    """(cases, tasks) scores of one evaluation; NaN where a case has no score for a task."""
    index = {(c, t): (i, j) for i, c in enumerate(cases) for j, t in enumerate(tasks)}
    out = np.full((len(cases), len(tasks)), np.nan)
    for row in rows:
        if row["dataset"] != dataset:
            continue
        where = index.get((str(row["case"]), str(row["task"])))
        value = row.get(metric)
        if where is not None and value is not None:
            out[where] = float(value)
    return out


def dataset_scores(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per replicate: the mean over tasks of the weighted per-task mean over cases.

    ``values`` (cases, tasks) with NaN for unscored pairs; ``weights`` (replicates, cases) the
    number of times each case was drawn (all ones: the plain table score).
    """
    valid = ~np.isnan(values)
    total = weights @ np.where(valid, values, 0.0)  # (replicates, tasks)
    count = weights @ valid.astype(np.float64)
    scored = count > 0  # a task with no scored case in a resample is left out of its mean
    task_means = np.where(scored, total / np.where(scored, count, 1.0), 0.0)
    n_tasks = scored.sum(axis=1)
    return np.where(n_tasks > 0, task_means.sum(axis=1) / np.maximum(n_tasks, 1), np.nan)


def _percentile_ci(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(finite, [0.025, 0.975])
    return float(low), float(high)


def paired_difference(
    rows_a: Mapping[int, Rows],
    rows_b: Mapping[int, Rows],
    datasets: Sequence[str],
    metric: str = "dice",
    samples: int = 10000,
    seed: int = 0,
    scale: float = 100.0,
    resample_seeds: bool = False,
) -> PairedDifference:
    """``a`` minus ``b`` on the seeds both have (see the module docstring for the bootstrap).

    Cases are matched by (dataset, case id), never by position; a dataset's cases are those
    that every seed of both models scored. Raises :class:`DataError` when the models share no
    seed or a dataset has no common case.
    """
    seeds = sorted(set(rows_a) & set(rows_b))
    if not seeds:
        raise DataError(f"no seed scored by both models (a: {sorted(rows_a)}, b: {sorted(rows_b)})")
    rng = np.random.default_rng(seed)
    seed_weights: np.ndarray | None = None  # (replicates, seeds): draw counts / number of seeds
    if resample_seeds:
        picks = rng.integers(0, len(seeds), size=(samples, len(seeds)))
        seed_weights = np.zeros((samples, len(seeds)))
        np.add.at(seed_weights, (np.arange(samples)[:, None], picks), 1.0 / len(seeds))
    replicate_diffs: list[np.ndarray] = []
    per_dataset: dict[str, float] = {}
    per_dataset_ci: dict[str, tuple[float, float]] = {}
    per_seed_parts: dict[int, list[float]] = {s: [] for s in seeds}
    n_cases: dict[str, int] = {}
    for dataset in datasets:
        case_sets = [
            {str(r["case"]) for r in rows[s] if r["dataset"] == dataset} for rows in (rows_a, rows_b) for s in seeds
        ]
        cases = sorted(set.intersection(*case_sets))
        if not cases:
            raise DataError(f"dataset {dataset!r}: no test case scored by both models on seeds {seeds}")
        tasks = sorted({str(r["task"]) for rows in (rows_a, rows_b) for s in seeds for r in rows[s] if r["dataset"] == dataset})
        n = len(cases)
        n_cases[dataset] = n
        counts = np.zeros((samples, n))
        drawn = rng.integers(0, n, size=(samples, n))
        np.add.at(counts, (np.arange(samples)[:, None], drawn), 1.0)
        ones = np.ones((1, n))
        point, boot = [], []
        for s in seeds:
            va = _matrix(rows_a[s], dataset, cases, tasks, metric)
            vb = _matrix(rows_b[s], dataset, cases, tasks, metric)
            diff_point = float((dataset_scores(va, ones) - dataset_scores(vb, ones))[0]) * scale
            point.append(diff_point)
            per_seed_parts[s].append(diff_point)
            boot.append((dataset_scores(va, counts) - dataset_scores(vb, counts)) * scale)
        per_dataset[dataset] = float(np.mean(point))
        stacked = np.stack(boot, axis=1)  # (replicates, seeds)
        # per replicate: mean over seeds (or over the replicate's resampled seeds)
        dataset_boot = stacked.mean(axis=1) if seed_weights is None else (stacked * seed_weights).sum(axis=1)
        per_dataset_ci[dataset] = _percentile_ci(dataset_boot)
        replicate_diffs.append(dataset_boot)
    overall_boot = np.mean(replicate_diffs, axis=0)  # per replicate: mean over datasets
    return PairedDifference(
        mean_diff=float(np.mean(list(per_dataset.values()))),
        ci95=_percentile_ci(overall_boot),
        per_dataset=per_dataset,
        per_dataset_ci95=per_dataset_ci,
        per_seed={s: float(np.mean(parts)) for s, parts in per_seed_parts.items()},
        n_cases=n_cases,
        seeds=seeds,
        samples=samples,
        **({"resampled": "seeds with replacement, then test cases with replacement within each dataset; "
                         "the same case ids for both models and all seeds"} if resample_seeds else {}),
    )
