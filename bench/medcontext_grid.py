"""The MedContext ablation grid of ``bench/medcontext.py --grid``: arms, run keys, log summaries
and the report's statistics.

Pure functions (no training), so that tests/test_medcontext_grid.py checks them on fake
results; bench/medcontext.py trains, scores and calls them.

Grid file (YAML)::

    arms:
      default: {}                              # the bench's MedContext settings unchanged
      w10: {consistency_weight: 10}            # any MedContextConfig key
      ramp: {masked_rampup_fraction: 0.5}      # bench key: half of the run's steps

An arm's overrides are merged over the bench's MedContext settings (``enabled``, the bench's
``mask_patch``, the cohort's lesion tasks in ``exclude_tasks``, and ``term_gradients_every`` so
that the last 20 % of the run holds a few gradient-share measurements). Keys are those of
``hermes.config.MedContextConfig``, plus the bench keys in :data:`FRACTION_KEYS`, which give a
ramp as a fraction of the run (resolved to ``round(fraction * steps)`` steps). ``enabled``
cannot be set (the baseline without MedContext is trained by the bench itself), and the arm
name ``baseline`` is reserved for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hermes.config import MedContextConfig, read_yaml, validate
from hermes.errors import ConfigError
from hermes.evaluation.paired import paired_difference

BASELINE = "baseline"
# Bench keys: a ramp length as a fraction of the run, resolved by the bench to the config's steps key.
FRACTION_KEYS = {
    "masked_rampup_fraction": "masked_rampup_steps",
    "consistency_rampup_fraction": "consistency_rampup_steps",
}
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # used in run folder names
TAIL = 0.2  # "end of the run": the last 20 % of the steps
# Logged quantities averaged over the tail (train_log.csv columns; grad_share_* only on the
# steps where term gradients were measured).
TAIL_COLUMNS = (
    "seg",
    "masked_supervised",
    "consistency",
    "weight_masked_supervised",
    "weight_consistency",
    "grad_share_supervised",
    "grad_share_masked_supervised",
    "grad_share_consistency",
)


# ----------------------------------------------------------------------------------------------
# Grid file
# ----------------------------------------------------------------------------------------------
def load_grid(path: Path) -> dict[str, dict[str, Any]]:
    """Arm name -> overrides, in file order; every arm is checked before anything trains.

    Errors (:class:`ConfigError`) name the file and the arm: an unknown key, ``enabled``, a key
    given both as steps and as a fraction, a value ``MedContextConfig`` rejects.
    """
    data = read_yaml(path)
    if set(data) != {"arms"} or not isinstance(data["arms"], dict) or not data["arms"]:
        raise ConfigError(f"{path}: the grid file needs exactly one top-level key `arms`, a non-empty mapping "
                          "of arm name -> MedContext overrides")
    arms: dict[str, dict[str, Any]] = {}
    for name, overrides in data["arms"].items():
        arms[str(name)] = check_arm(path, str(name), overrides)
    return arms


def check_arm(path: Path | str, name: str, overrides: Any) -> dict[str, Any]:
    where = f"{path}: arm {name!r}"
    if name == BASELINE:
        raise ConfigError(f"{where}: the name {BASELINE!r} is reserved for the run without MedContext")
    if not _ARM_NAME.match(name):
        raise ConfigError(f"{where}: arm names use letters, digits, '_', '.', '-' (they name run folders)")
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides must be a mapping of MedContextConfig keys, got {overrides!r}")
    known = set(MedContextConfig.model_fields) - {"enabled"}
    for key, value in overrides.items():
        if key == "enabled":
            raise ConfigError(f"{where}: `enabled` cannot be set; every arm runs MedContext and the bench "
                              "trains the baseline without it")
        if key in FRACTION_KEYS:
            if FRACTION_KEYS[key] in overrides:
                raise ConfigError(f"{where}: give {key} or {FRACTION_KEYS[key]}, not both")
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{where}: {key} must be a number in [0, 1] (a fraction of the run), got {value!r}")
        elif key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(known))}, "
                              f"and the bench keys {', '.join(FRACTION_KEYS)}")
    try:  # values too, with placeholder run settings
        resolve_arm(overrides, {"enabled": True}, steps=100)
    except ConfigError as error:
        raise ConfigError(f"{where}: " + str(error).replace(":\n  ", ": ").replace("\n  ", "; ")) from None
    return dict(overrides)


def resolve_arm(overrides: Mapping[str, Any], defaults: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """The ``medcontext`` section of one arm's training config: ``defaults`` with the overrides
    on top, fraction keys turned into step counts, values normalised by ``MedContextConfig``.

    Only the keys that are set are returned (the rest are the config's defaults), so this is
    also the arm's part of the run key.
    """
    merged = dict(defaults)
    for key, value in overrides.items():
        if key in FRACTION_KEYS:
            merged[FRACTION_KEYS[key]] = round(float(value) * steps)
        else:
            merged[key] = value
    dumped = validate(MedContextConfig, merged, "(medcontext section)").model_dump(mode="json")
    return {key: dumped[key] for key in merged}


# ----------------------------------------------------------------------------------------------
# Run keys (resume)
# ----------------------------------------------------------------------------------------------
def run_key(
    settings: Mapping[str, Any], shots: int, seed: int, arm: str, steps: int, medcontext: Mapping[str, Any] | None
) -> dict[str, Any]:
    """What identifies a finished run: the bench settings, shots, seed, arm name, steps and the
    arm's resolved ``medcontext`` section (None for the baseline). A changed arm, or any other
    setting, gives a new key, so that run trains again; code changes do not (use a new WORK)."""
    return {
        "settings": dict(settings),
        "shots": int(shots),
        "seed": int(seed),
        "arm": arm,
        "steps": int(steps),
        "medcontext": None if medcontext is None else dict(medcontext),
    }


def key_id(key: Mapping[str, Any]) -> str:
    """A short stable hash of a run key (part of the run folder's name)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def finished_runs(results_path: Path) -> dict[str, dict[str, Any]]:
    """key_id -> row of every grid run in ``results.jsonl`` (other rows, e.g. of the
    baseline-vs-MedContext mode, are ignored; a later row for the same key wins)."""
    done: dict[str, dict[str, Any]] = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if "grid_key" in row:
                done[key_id(row["grid_key"])] = row
    return done


# ----------------------------------------------------------------------------------------------
# One run's train_log.csv
# ----------------------------------------------------------------------------------------------
def log_summary(rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Step time and the end-of-run size of each logged term.

    ``rows``: train_log.csv rows as floats, empty cells left out. Each row covers the steps
    since the previous one at ``steps_per_s``.

    * ``step_s``: seconds per step over the windows without a term-gradient measurement
      (those windows pay three extra backward passes, which no user run does at that rate);
      all windows if every one had a measurement. ``step_s_all``: over all windows.
    * ``tail``: the mean of each :data:`TAIL_COLUMNS` column over the rows of the last 20 %
      of the run (``step > 0.8 * last step``), over the rows where it is present; missing
      columns are left out.
    """
    if not rows:
        return {"step_s": math.nan, "step_s_all": math.nan, "tail": {}}
    windows = []
    previous = 0.0
    for row in rows:
        windows.append((row["step"] - previous, row["steps_per_s"], any(k.startswith("grad_share_") for k in row)))
        previous = row["step"]

    def per_step(selected: list[tuple[float, float, bool]]) -> float:
        steps = sum(n for n, _, _ in selected)
        return sum(n / rate for n, rate, _ in selected) / steps if steps > 0 else math.nan

    clean = [w for w in windows if not w[2]]
    last = rows[-1]["step"]
    tail_rows = [r for r in rows if r["step"] > (1.0 - TAIL) * last]
    tail = {}
    for column in TAIL_COLUMNS:
        values = [r[column] for r in tail_rows if column in r]
        if values:
            tail[column] = statistics.fmean(values)
    return {"step_s": per_step(clean or windows), "step_s_all": per_step(windows), "tail": tail}


# ----------------------------------------------------------------------------------------------
# Report statistics
# ----------------------------------------------------------------------------------------------
def _case_rows(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{**c, "dice": math.nan if c["dice"] is None else c["dice"]} for c in row["cases"]]


def compare(
    arm_runs: Mapping[int, Mapping[str, Any]],
    base_runs: Mapping[int, Mapping[str, Any]],
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Arm minus baseline on the seeds both have (None if none).

    ``*_runs``: seed -> result row (``dice`` and per-case ``cases``). The difference is paired
    by seed and by test case; its 95 % interval is a percentile bootstrap that resamples seeds
    and, within each dataset, test cases (``hermes.evaluation.paired`` with
    ``resample_seeds``). Dice on the 0-1 scale.
    """
    seeds = sorted(set(arm_runs) & set(base_runs))
    if not seeds:
        return None
    datasets = sorted(set.intersection(*({c["dataset"] for c in runs[s]["cases"]}
                                         for runs in (arm_runs, base_runs) for s in seeds)))
    diff = paired_difference(
        {s: _case_rows(arm_runs[s]) for s in seeds},
        {s: _case_rows(base_runs[s]) for s in seeds},
        datasets,
        "dice",
        samples=samples,
        seed=seed,
        scale=1.0,
        resample_seeds=True,
    )
    dice = [float(arm_runs[s]["dice"]) for s in seeds]
    return {
        "seeds": seeds,
        "dice_mean": statistics.fmean(dice),
        "dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
        "diff": diff.mean_diff,
        "ci95": diff.ci95,
        "per_seed": [diff.per_seed[s] for s in seeds],
        "per_dataset": diff.per_dataset,
    }


def _mean(runs: Mapping[int, Mapping[str, Any]], get: Any) -> float | None:
    values = [v for v in (get(r) for r in runs.values()) if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def arm_table(
    arms: Mapping[str, Mapping[int, Mapping[str, Any]]],
    base_runs: Mapping[int, Mapping[str, Any]],
    samples: int = 2000,
) -> list[str]:
    """Markdown table, one row per arm (in the given order) after the baseline's row."""
    lines = [
        "| arm | Dice | Δ vs baseline | 95 % CI (seeds × cases) | per-seed Δ | s / step | seg | masked sup. | "
        "consistency | weight cons. | grad share sup. / masked / cons. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if base_runs:
        dice = [float(r["dice"]) for r in base_runs.values()]
        sd = statistics.stdev(dice) if len(dice) > 1 else 0.0
        step = _mean(base_runs, lambda r: r["log"]["step_s"])
        seg = _mean(base_runs, lambda r: r["log"]["tail"].get("seg"))
        lines.append(f"| {BASELINE} ({len(dice)} seeds) | {statistics.fmean(dice):.3f} ± {sd:.3f} | | | | "
                     f"{_fmt(step, '.2f')} | {_fmt(seg, '.3f')} | | | | |")
    for name, runs in arms.items():
        result = compare(runs, base_runs, samples=samples)
        if result is None:
            lines.append(f"| {name} | not run yet | | | | | | | | | |")
            continue

        def tail(column: str, runs: Mapping[int, Mapping[str, Any]] = runs) -> float | None:
            return _mean(runs, lambda r: r["log"]["tail"].get(column))

        shares = " / ".join(_fmt(tail(f"grad_share_{t}"), ".2f")
                            for t in ("supervised", "masked_supervised", "consistency"))
        low, high = result["ci95"]
        lines.append(
            f"| {name} | {result['dice_mean']:.3f} ± {result['dice_sd']:.3f} | {result['diff']:+.3f} | "
            f"[{low:+.3f}, {high:+.3f}] | {', '.join(f'{d:+.3f}' for d in result['per_seed'])} | "
            f"{_fmt(_mean(runs, lambda r: r['log']['step_s']), '.2f')} | {_fmt(tail('seg'), '.3f')} | "
            f"{_fmt(tail('masked_supervised'), '.3f')} | {_fmt(tail('consistency'), '.4f')} | "
            f"{_fmt(tail('weight_consistency'), '.3g')} | {shares} |"
        )
    return lines


def dataset_table(
    arms: Mapping[str, Mapping[int, Mapping[str, Any]]],
    base_runs: Mapping[int, Mapping[str, Any]],
    samples: int = 2000,
) -> list[str]:
    """Markdown table of the paired difference (arm − baseline) per dataset."""
    results = {name: compare(runs, base_runs, samples=samples) for name, runs in arms.items()}
    datasets = sorted({d for r in results.values() if r is not None for d in r["per_dataset"]})
    if not datasets:
        return []
    lines = ["| arm | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for name, result in results.items():
        if result is not None:
            cells = [_fmt(result["per_dataset"].get(d), "+.3f") for d in datasets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
