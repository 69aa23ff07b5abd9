"""The paper's main table at CPU scale: one universal model vs one traditional model per dataset.

For one catalog (or the built-in synthetic cohort, generated and prepared here) and one step
budget, trains

  (a) a traditional model per dataset (``paradigm: traditional, dataset: NAME``; ResUNet, and
      optionally MedFormer / MONAI DynUNet / MONAI SwinUNETR), same preset,
  (b) one universal Hermes-R (optionally Hermes-M and the ablations: no modality priors,
      single-scale prototypes, no decoder fusion),

then evaluates every model on the same test cases (Dice, HD95, NSD on each case's native grid,
``hermes.evaluation.evaluate_model``, the paper's oracle prompt) and writes the table in the
paper's layout: rows = model + paradigm, columns = datasets + mean, mean +- std over seeds.

Budget rule (printed in the output): every model gets the same number of optimiser steps, so
the N traditional models of a catalog together get N times the universal model's compute.

Resumable at the run level: a (model, dataset, seed) whose ``result.json`` exists is skipped,
a run with a checkpoint resumes from it, so a long background run survives interruption.

    .venv/bin/python bench/paradigm.py --synthetic --work runs/bench_paradigm/synthetic \\
        --steps 200 --seeds 0 --models resunet hermes_r
    .venv/bin/python bench/paradigm.py --catalog runs/bench_paradigm/realmini/catalog.yaml \\
        --cache runs/bench_paradigm/realmini/cache --work runs/bench_paradigm/realmini --steps 200
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hermes.fileio import atomic_write_json, atomic_write_text, json_safe

REPO = Path(__file__).resolve().parents[1]
# The synthetic datasets that mirror the paper's table columns (BCV, LiTS, KiTS, CHAOS, AMOS-MR).
PAPER_LIKE = ["AbdomenCT", "LiverCT", "KidneyCT", "AbdomenT2", "AbdomenT1"]
METRICS = ("dice", "hd95", "nsd")


@dataclass(frozen=True)
class ModelRow:
    key: str
    label: str
    paradigm: str  # "universal" | "traditional"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides


MODELS: dict[str, ModelRow] = {
    row.key: row
    for row in (
        ModelRow("resunet", "ResUNet", "traditional", {"architecture": "resunet"}),
        ModelRow("hermes_r", "Hermes-R", "universal", {"architecture": "hermes_resunet"}),
        ModelRow("medformer", "MedFormer", "traditional", {"architecture": "medformer"}),
        ModelRow("hermes_m", "Hermes-M", "universal", {"architecture": "hermes_medformer"}),
        ModelRow("dynunet", "DynUNet (MONAI)", "traditional", {"architecture": "dynunet"}),
        ModelRow("swinunetr", "SwinUNETR (MONAI)", "traditional", {"architecture": "swinunetr"}),
        ModelRow(
            "hermes_r_no_modality",
            "Hermes-R w/o modality priors",
            "universal",
            {"architecture": "hermes_resunet", "modality_priors": False},
        ),
        ModelRow(
            "hermes_r_single_scale",
            "Hermes-R single-scale prototypes",
            "universal",
            {"architecture": "hermes_resunet", "multiscale_prototypes": False},
        ),
        ModelRow(
            "hermes_r_no_dec_fusion",
            "Hermes-R w/o decoder fusion",
            "universal",
            {"architecture": "hermes_resunet", "fusion_stages": ["enc2", "enc3", "bottleneck"]},
        ),
    )
}


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hermes"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + (" (+ uncommitted changes under hermes/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _proc_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each phase reports its own peak RSS."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def synthetic_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Generate the synthetic cohort, write its catalog and prepare the cache (each step once)."""
    from hermes.data.catalog import default_catalog_spec
    from hermes.synthetic import generate_cohort

    cohort = work / "cohort"
    folders = generate_cohort(
        cohort,
        seed=args.data_seed,
        scale=args.scale,
        datasets=args.synthetic_datasets,
        cases=args.cases,
        test_cases=args.test_cases,
        progress=False,
    )
    catalog = work / "catalog.yaml"
    if not catalog.exists():
        atomic_write_text(catalog, yaml.safe_dump(default_catalog_spec(folders)))
    return catalog, work / "cache"


def ensure_cache(catalog_path: Path, cache: Path, workers: int) -> None:
    from hermes.data.cache import prepare_cache
    from hermes.data.catalog import load_catalog

    marker = cache / ".paradigm_prepared"
    if marker.exists():
        return
    log(f"preparing {catalog_path} -> {cache}")
    start = time.perf_counter()
    report = prepare_cache(load_catalog(catalog_path), cache, workers=workers, progress=False)
    log(f"prepared: {report.summary()} in {time.perf_counter() - start:.0f} s")
    atomic_write_text(marker, "ok\n")


# --------------------------------------------------------------------------------------------
# One run: train + evaluate
# --------------------------------------------------------------------------------------------
def train_config(
    row: ModelRow,
    dataset: str | None,
    seed: int,
    out: Path,
    args: argparse.Namespace,
    catalog: Path,
    cache: Path,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "catalog": str(catalog.resolve()),
        "cache": str(cache.resolve()),
        "output": str(out.resolve()),
        "paradigm": row.paradigm,
        "seed": seed,
        "steps": args.steps,
        "checkpoint_every": max(25, args.steps // 4),
        "log_every": 10,
        "model": {"preset": args.preset, **row.model},
        "data": {
            "patch_size": [args.patch] * 3,
            "batch_size": args.batch,
            "num_workers": args.loader_workers,
            "val_fraction": 0.0,
        },  # no validation hold-out: every model sees all training cases
        "optim": {"lr": args.lr, "warmup_steps": min(50, max(1, args.steps // 10))},
        "validation": {"every_steps": 10**9},
    }
    if dataset is not None:
        config["dataset"] = dataset
    return config


def run_one(
    row: ModelRow,
    dataset: str | None,
    seed: int,
    run_dir: Path,
    eval_datasets: list[str],
    args: argparse.Namespace,
    catalog: Path,
    cache: Path,
) -> dict[str, Any]:
    from hermes.config import EvaluationConfig, InferenceConfig, TrainConfig, validate
    from hermes.evaluation.evaluate import evaluate_model
    from hermes.models.registry import read_spec
    from hermes.training.checkpoint import checkpoint_path
    from hermes.training.trainer import train

    out = run_dir / "train"
    model_dir = out / "model"
    timing_file = run_dir / "train_timing.json"
    if not (model_dir / "spec.json").exists() or not timing_file.exists():
        config = validate(
            TrainConfig, train_config(row, dataset, seed, out, args, catalog, cache), str(run_dir)
        )
        resume = checkpoint_path(out).exists()
        if out.exists() and not resume:
            shutil.rmtree(out)
        _reset_peak()
        start = time.perf_counter()
        result = train(config, resume=resume, progress=False)
        wall = time.perf_counter() - start
        atomic_write_json(
            timing_file,
            {
                "train_wall_s": wall,
                "resumed": resume,
                "steps": result.steps,
                "train_peak_rss_mb": _proc_mb("VmHWM"),
            },
        )
    timing = json.loads(timing_file.read_text())
    _reset_peak()
    start = time.perf_counter()
    evaluation = evaluate_model(
        model_dir,
        catalog,
        split="test",
        datasets=eval_datasets,
        device="cpu",
        progress=False,
        max_cases=args.max_test_cases,
        inference=InferenceConfig(overlap=args.overlap),
        config=EvaluationConfig(bootstrap_samples=0, workers=1),
    )
    eval_wall = time.perf_counter() - start
    spec = read_spec(model_dir)
    n_cases = len({(r["dataset"], r["case"]) for r in evaluation.rows})
    per_dataset = {
        name: {
            "n_cases": entry["n_cases"],
            **{m: entry["mean"][m]["mean"] for m in METRICS},
            "tasks": {task: {m: stats[m]["mean"] for m in METRICS} for task, stats in entry["tasks"].items()},
        }
        for name, entry in evaluation.summary["datasets"].items()
    }
    steps_log = _steps_per_s(out / "train_log.csv")
    return {
        "model": row.key,
        "label": row.label,
        "paradigm": row.paradigm,
        "dataset": dataset,
        "seed": seed,
        "steps": args.steps,
        "preset": args.preset,
        "patch": args.patch,
        "batch": args.batch,
        "parameters": _parameters(spec),
        **timing,
        "median_steps_per_s": steps_log,
        "eval_wall_s": eval_wall,
        "eval_cases": n_cases,
        "eval_s_per_case": eval_wall / max(n_cases, 1),
        "eval_peak_rss_mb": _proc_mb("VmHWM"),
        "datasets": per_dataset,
    }


def _parameters(spec: dict[str, Any]) -> int | None:
    for key in ("parameters", "num_parameters", "n_parameters"):
        for where in (spec, spec.get("model", {}), spec.get("training", {})):
            if isinstance(where, dict) and isinstance(where.get(key), int):
                return int(where[key])
    return None


def _steps_per_s(csv_path: Path) -> float | None:
    """Median of the logged training speed (the logger's steps_per_s over each 10-step window)."""
    if not csv_path.exists():
        return None
    lines = csv_path.read_text().splitlines()
    if len(lines) < 2:
        return None
    header = lines[0].split(",")
    if "steps_per_s" not in header:
        return None
    col = header.index("steps_per_s")
    values = [float(line.split(",")[col]) for line in lines[1:] if line.count(",") >= col]
    return float(np.median(values)) if values else None


def count_params(row: ModelRow, catalog_path: Path, dataset: str | None, preset: str, patch: int) -> int:
    """Parameter count of a model as the runs build it (no training needed)."""
    from hermes.config import ModelConfig
    from hermes.data.catalog import load_catalog
    from hermes.models.registry import build_model, count_parameters

    catalog = load_catalog(catalog_path)
    task_ids = None
    if dataset is not None:
        task_ids = next(list(e.task_ids) for e in catalog.datasets if e.name == dataset)
    model = build_model(
        ModelConfig.model_validate({"preset": preset, **row.model}),
        num_tasks=catalog.num_tasks,
        num_modalities=len(catalog.modalities),
        task_ids_of_model=task_ids,
        patch_size=[patch] * 3,
    )
    return count_parameters(model)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _ms(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def aggregate(results: list[dict[str, Any]], datasets: list[str], models: list[str]) -> dict[str, Any]:
    """Per model row, per dataset: the metric of every seed; per seed the mean over datasets
    (only for seeds with every dataset scored)."""
    table: dict[str, Any] = {}
    for key in models:
        row_results = [r for r in results if r["model"] == key]
        if not row_results:
            continue
        seeds = sorted({r["seed"] for r in row_results})
        per_metric: dict[str, Any] = {}
        for metric in METRICS:
            cells: dict[str, dict[int, float]] = {d: {} for d in datasets}
            for r in row_results:
                for name, entry in r["datasets"].items():
                    if name in cells and entry.get(metric) is not None:
                        cells[name][r["seed"]] = float(entry[metric])
            means = {
                s: float(np.mean([cells[d][s] for d in datasets]))
                for s in seeds
                if all(s in cells[d] for d in datasets)
            }
            per_metric[metric] = {
                "cells": {d: {str(s): v for s, v in c.items()} for d, c in cells.items()},
                "mean_over_datasets": {str(s): v for s, v in means.items()},
            }
        table[key] = {
            "label": MODELS[key].label,
            "paradigm": MODELS[key].paradigm,
            "seeds": seeds,
            "metrics": per_metric,
            "train_wall_s": sum(r.get("train_wall_s", 0.0) for r in row_results),
            "eval_wall_s": sum(r.get("eval_wall_s", 0.0) for r in row_results),
            "runs": len(row_results),
        }
    return table


def task_table(results: list[dict[str, Any]], datasets: list[str], table: dict[str, Any]) -> list[str]:
    """Per-task Dice (mean over seeds): where a dataset mean hides one failed structure."""
    keys = list(table)
    cells: dict[str, dict[str, list[float]]] = {}
    for r in results:
        for name, entry in r["datasets"].items():
            if name not in datasets:
                continue
            for task, stats in entry.get("tasks", {}).items():
                if stats.get("dice") is not None:
                    cells.setdefault(task, {}).setdefault(r["model"], []).append(100.0 * stats["dice"])
    if not cells:
        return []
    lines = ["**Dice (%) per task** (mean over the seeds run)", ""]
    lines.append("| Task | " + " | ".join(table[k]["label"] for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for task in sorted(
        cells, key=lambda t: datasets.index(t.split("/")[0]) if t.split("/")[0] in datasets else 0
    ):
        row = [f"{np.mean(cells[task][k]):.1f}" if k in cells[task] else "-" for k in keys]
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def markdown(
    table: dict[str, Any],
    datasets: list[str],
    meta: dict[str, Any],
    results: list[dict[str, Any]] | None = None,
) -> str:
    scale = {
        "dice": (100.0, 1, "Dice (%)"),
        "nsd": (100.0, 1, f"NSD (%, {meta['nsd_tolerance_mm']:g} mm)"),
        "hd95": (1.0, 1, "HD95 (mm)"),
    }
    lines = [f"### {meta['title']}", ""]
    lines.append(
        f"Budget rule: every model (the universal one and each per-dataset traditional model) is trained for "
        f"{meta['steps']} steps (batch {meta['batch']}, patch {meta['patch']}^3, preset `{meta['preset']}`), so the "
        f"{len(datasets)} traditional models of a row together get {len(datasets)}x the universal model's compute. "
        f"Test cases: {meta['test_cases']}. Cells: mean ± std over seeds (a single number: one seed); the mean "
        f"column is the mean over datasets, per seed, then over seeds (only seeds with every dataset scored)."
    )
    lines.append("")
    for metric in ("dice", "nsd", "hd95"):
        factor, digits, title = scale[metric]
        lines.append(f"**{title}**" + (" (lower is better)" if metric == "hd95" else ""))
        lines.append("")
        lines.append("| Model | Paradigm | seeds | " + " | ".join(datasets) + " | Mean |")
        lines.append("|---|---|---|" + "---|" * (len(datasets) + 1))
        for entry in table.values():
            m = entry["metrics"][metric]
            cells = [_ms([v * factor for v in m["cells"][d].values()], digits) for d in datasets]
            mean = _ms([v * factor for v in m["mean_over_datasets"].values()], digits)
            seeds = ",".join(str(s) for s in entry["seeds"])
            lines.append(
                f"| {entry['label']} | {entry['paradigm']} | {seeds} | " + " | ".join(cells) + f" | {mean} |"
            )
        lines.append("")
    lines.extend(task_table(results or [], datasets, table))
    lines.append(
        "**Wall time** (this machine, shared CPU; all seeds and, for traditional rows, all datasets)"
    )
    lines.append("")
    lines.append("| Model | Paradigm | runs | train (min) | evaluate (min) |")
    lines.append("|---|---|---|---|---|")
    for entry in table.values():
        lines.append(
            f"| {entry['label']} | {entry['paradigm']} | {entry['runs']} | "
            f"{entry['train_wall_s'] / 60:.1f} | {entry['eval_wall_s'] / 60:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def collect(work: Path) -> list[dict[str, Any]]:
    """Every finished run under WORK (also those of other invocations, e.g. other --models)."""
    return [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*/*/seed*/result.json"))]


def write_outputs(out: Path, work: Path, datasets: list[str], meta: dict[str, Any]) -> Path:
    results = collect(work)
    present = {r["model"] for r in results}
    table = aggregate(results, datasets, [key for key in MODELS if key in present])
    atomic_write_json(
        out / "paradigm.json",
        {"meta": meta, "datasets": datasets, "table": table, "runs": json_safe(results)},
    )
    md = out / "paradigm.md"
    atomic_write_text(md, markdown(table, datasets, meta, results))
    return md


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--catalog", type=Path, help="catalog YAML (with --cache: its prepared cache, made if missing)"
    )
    source.add_argument(
        "--synthetic", action="store_true", help="generate + prepare the synthetic cohort in WORK"
    )
    parser.add_argument("--cache", type=Path, help="cache folder of --catalog (prepared here if missing)")
    parser.add_argument(
        "--work", type=Path, required=True, help="folder for the runs (and the synthetic cohort)"
    )
    parser.add_argument("--out", type=Path, help="where paradigm.md / paradigm.json go (default: WORK)")
    parser.add_argument("--title", default=None, help="table title")
    parser.add_argument(
        "--synthetic-datasets",
        nargs="+",
        default=PAPER_LIKE,
        help=f"synthetic datasets (default: the paper-like {' '.join(PAPER_LIKE)})",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="synthetic: voxels per axis relative to default"
    )
    parser.add_argument("--cases", type=int, default=None, help="synthetic: training cases per dataset")
    parser.add_argument("--test-cases", type=int, default=None, help="synthetic: test cases per dataset")
    parser.add_argument("--data-seed", type=int, default=0, help="synthetic: cohort seed")
    parser.add_argument(
        "--steps", type=int, default=200, help="optimiser steps of EVERY model (the budget rule)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["resunet", "hermes_r"],
        choices=sorted(MODELS),
        help="rows to run, in order",
    )
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap at evaluation")
    parser.add_argument(
        "--max-test-cases", type=int, default=None, help="at most this many test cases per dataset"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: measured faster than 2 on this 2-core machine under shared load)",
    )
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers (0: main process)")
    parser.add_argument("--prepare-workers", type=int, default=1)
    parser.add_argument(
        "--deadline",
        default=None,
        help="HH:MM (local time): start no new run after it (the table is still written)",
    )
    args = parser.parse_args(argv)
    if args.catalog is not None and args.cache is None:
        parser.error("--catalog needs --cache")
    if args.steps < 1:
        parser.error("--steps must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from hermes.data.catalog import load_catalog

    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = (args.out or work).resolve()
    if args.synthetic:
        catalog_path, cache = synthetic_data(work, args)
    else:
        catalog_path, cache = args.catalog.resolve(), args.cache.resolve()
    ensure_cache(catalog_path, cache, args.prepare_workers)
    catalog = load_catalog(catalog_path)
    datasets = [e.name for e in catalog.datasets if not e.test_only and e.num_train > 0 and e.num_test > 0]
    meta = {
        "title": args.title
        or f"{'Synthetic cohort' if args.synthetic else catalog_path.name}: universal vs "
        f"traditional, {args.steps} steps per model",
        "catalog": str(catalog_path),
        "steps": args.steps,
        "batch": args.batch,
        "patch": args.patch,
        "preset": args.preset,
        "lr": args.lr,
        "threads": args.threads,
        "overlap": args.overlap,
        "test_cases": "all test cases of each dataset"
        + (f", at most {args.max_test_cases}" if args.max_test_cases else ""),
        "nsd_tolerance_mm": 2.0,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "commit": git_commit(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    runs: list[tuple[ModelRow, str | None, int, list[str]]] = []
    for seed in args.seeds:
        for key in args.models:
            row = MODELS[key]
            if row.paradigm == "universal":
                runs.append((row, None, seed, datasets))
            else:
                runs.extend((row, d, seed, [d]) for d in datasets)
    log(
        f"{len(runs)} runs over {len(datasets)} datasets ({', '.join(datasets)}), {args.steps} steps each; "
        f"budget rule: every model gets the same steps, so the traditional models get {len(datasets)}x "
        f"the universal model's compute in total"
    )
    deadline = _deadline(args.deadline)
    failures: list[str] = []
    for index, (row, dataset, seed, eval_datasets) in enumerate(runs, start=1):
        run_dir = work / "runs" / row.key / (dataset or "universal") / f"seed{seed}"
        result_file = run_dir / "result.json"
        name = f"({index}/{len(runs)}) {row.label} [{row.paradigm}] {dataset or 'all datasets'} seed {seed}"
        if result_file.exists():
            log(f"{name}: done earlier, skipped")
            continue
        if deadline is not None and datetime.datetime.now() > deadline:
            log(f"{name}: not started (past the deadline {args.deadline})")
            continue
        log(f"{name}: training {args.steps} steps + evaluation")
        start = time.perf_counter()
        try:
            result = run_one(row, dataset, seed, run_dir, eval_datasets, args, catalog_path, cache)
        except Exception as error:  # one failed row must not stop a long background run
            failures.append(
                f"{row.key} {dataset or 'universal'} seed {seed}: {type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            )
            log(f"{name}: FAILED ({failures[-1]}); continuing")
            atomic_write_text(run_dir / "error.txt", f"{type(error).__name__}: {error}\n")
            continue
        if result["parameters"] is None:
            result["parameters"] = count_params(row, catalog_path, dataset, args.preset, args.patch)
        atomic_write_json(result_file, json_safe(result))
        dice = " ".join(
            f"{d}={v['dice']:.3f}" for d, v in result["datasets"].items() if v["dice"] is not None
        )
        log(
            f"{name}: {time.perf_counter() - start:.0f} s (train {result['train_wall_s']:.0f} s, "
            f"eval {result['eval_wall_s']:.0f} s); Dice {dice}"
        )
        write_outputs(out, work, datasets, meta)
    md = write_outputs(out, work, datasets, meta)
    log(f"table: {md}")
    for failure in failures:
        log(f"failed: {failure}")
    print(md.read_text())
    return 1 if failures else 0


def _deadline(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    hour, minute = (int(x) for x in text.split(":"))
    return datetime.datetime.now().replace(hour=hour, minute=minute, second=0, microsecond=0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
