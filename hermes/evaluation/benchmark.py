"""``hermes benchmark``: universal vs per-dataset training on the same test cases, paired.

For one catalog (or the built-in synthetic cohort, generated and prepared in WORK), a list of
model rows and seeds, this trains

* per **traditional** row one model per dataset (``paradigm: traditional, dataset: NAME``),
* per **universal** row one model on all training datasets (Hermes-R, Hermes-M, their
  ablations, or ``shared_resunet``: the same ResUNet with one sigmoid output per catalog task,
  universal training without priors),

evaluates every model on the same test cases (``evaluate_model``: native grid, the dataset's
own tasks and modality as the prompt), and writes ``paradigm.md`` / ``paradigm.json`` (the
paper's layout: Dice, NSD, HD95 per dataset and per task, mean ± std over seeds) and
``summary.json`` (paired per-seed differences with a case-bootstrap 95 % CI; see
:mod:`hermes.evaluation.paired`).

Budget rules: ``equal_total_compute`` (default) trains each per-dataset model S steps and each
universal model N x S steps, N the number of training datasets it covers; ``equal_steps``
trains every model S steps.

Every run's config is, from lowest to highest priority: the benchmark's defaults (tiny model,
32^3 patches, batch 2, lr 0.004, validation only at the end), ``--preset NAME`` (a
hermes/configs preset), ``--recipe FILE`` (any TrainConfig keys), the explicit flags
(``--preset-size``, ``--patch``, ``--batch``, ``--lr``, ``--val-fraction``), and last what the
benchmark decides per run (paradigm, dataset, seed, steps, architecture). The same recipe goes
to every row, so the comparison is between paradigms, not between recipes.

Runs are independent folders ``WORK/runs/<model>/<dataset|universal>/seed<k>``: a run whose
``result.json`` exists is skipped, one with a checkpoint resumes, one that another process is
running (a lock file) is left to it. WORK remembers its settings (``benchmark.json``); another
invocation with different settings is refused, so a table never mixes budgets or recipes.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hermes.config import TrainConfig, deep_merge, load_preset, read_yaml, validate
from hermes.errors import ConfigError
from hermes.evaluation import benchmark_report as report
from hermes.fileio import atomic_write_json, atomic_write_text, json_safe

# The synthetic datasets that mirror the paper's table columns (BCV, LiTS, KiTS, CHAOS, AMOS-MR).
PAPER_LIKE = ["AbdomenCT", "LiverCT", "KidneyCT", "AbdomenT2", "AbdomenT1"]
BUDGET_RULES = ("equal_total_compute", "equal_steps")
SETTINGS_FILE = "benchmark.json"


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
        ModelRow("shared_resunet", "ResUNet (shared)", "universal", {"architecture": "resunet"}),
        ModelRow("medformer", "MedFormer", "traditional", {"architecture": "medformer"}),
        ModelRow("hermes_m", "Hermes-M", "universal", {"architecture": "hermes_medformer"}),
        ModelRow("dynunet", "DynUNet (MONAI)", "traditional", {"architecture": "dynunet"}),
        ModelRow("swinunetr", "SwinUNETR (MONAI)", "traditional", {"architecture": "swinunetr"}),
        ModelRow("hermes_r_no_modality", "Hermes-R w/o modality priors", "universal",
                 {"architecture": "hermes_resunet", "modality_priors": False}),
        ModelRow("hermes_r_single_scale", "Hermes-R single-scale prototypes", "universal",
                 {"architecture": "hermes_resunet", "multiscale_prototypes": False}),
        ModelRow("hermes_r_no_dec_fusion", "Hermes-R w/o decoder fusion", "universal",
                 {"architecture": "hermes_resunet", "fusion_stages": ["enc2", "enc3", "bottleneck"]}),
    )
}  # fmt: skip
# Universal minus traditional, and Hermes minus universal-without-priors.
DEFAULT_PAIRS = [("hermes_r", "resunet"), ("shared_resunet", "resunet"), ("hermes_r", "shared_resunet")]

# Set by the benchmark per run: a recipe may not change them (the budget rule and the rows own them).
RUN_KEYS = ("catalog", "cache", "output", "paradigm", "dataset", "seed", "steps")
# Benchmark defaults below any preset or recipe (CPU scale, as the tables in docs/benchmarks.md).
BENCH_DEFAULTS: dict[str, Any] = {
    "log_every": 10,
    "model": {"preset": "tiny"},
    "data": {"patch_size": [32, 32, 32], "batch_size": 2},
    "optim": {"lr": 0.004},
}


@dataclass
class BenchmarkOptions:
    work: Path
    catalog: Path | None = None
    cache: Path | None = None
    synthetic: bool = False
    synthetic_datasets: list[str] = field(default_factory=lambda: list(PAPER_LIKE))
    cases: int | None = None
    test_cases: int | None = None
    data_seed: int = 0
    scale: float = 1.0
    out: Path | None = None
    data_name: str | None = None
    title: str | None = None
    models: list[str] = field(default_factory=lambda: ["resunet", "hermes_r"])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 200
    budget_rule: str = "equal_total_compute"
    recipe: Path | None = None
    preset: str | None = None
    preset_size: str | None = None
    patch: int | None = None
    batch: int | None = None
    lr: float | None = None
    val_fraction: float | None = None
    max_test_cases: int | None = None
    overlap: float = 0.5
    threads: int = 1
    loader_workers: int = 0
    prepare_workers: int = 1
    device: str | None = None
    compare: list[tuple[str, str]] | None = None
    bootstrap_samples: int = 10000
    bootstrap_seed: int = 0
    summary_into: Path | None = None
    deadline: str | None = None
    # Write the tables from the runs already finished under WORK; train nothing (a table can be
    # rebuilt, e.g. with --summary-into, while other seeds are still running or not started).
    report_only: bool = False
    progress: bool = False
    command: str = ""


@dataclass(frozen=True)
class Run:
    row: ModelRow
    dataset: str | None  # None: universal
    seed: int
    steps: int
    eval_datasets: tuple[str, ...]

    def folder(self, work: Path) -> Path:
        return work / "runs" / self.row.key / (self.dataset or "universal") / f"seed{self.seed}"

    def name(self) -> str:
        return f"{self.row.label} [{self.row.paradigm}] {self.dataset or 'all datasets'} seed {self.seed}"


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Checks and configs
# --------------------------------------------------------------------------------------------
def check_options(options: BenchmarkOptions) -> None:
    """Every argument error before any work (one line each, naming the argument)."""
    unknown = [k for k in options.models if k not in MODELS]
    if unknown:
        raise ConfigError(f"--models: unknown model {', '.join(unknown)}; known: {', '.join(MODELS)}")
    for a, b in options.compare or []:
        for key in (a, b):
            if key not in MODELS:
                raise ConfigError(f"--compare {a}:{b}: unknown model {key!r}; known: {', '.join(MODELS)}")
    if options.budget_rule not in BUDGET_RULES:
        raise ConfigError(f"--budget-rule {options.budget_rule!r}: use one of {', '.join(BUDGET_RULES)}")
    if options.steps < 1:
        raise ConfigError(f"--steps must be positive, got {options.steps}")
    if not options.seeds:
        raise ConfigError("--seeds needs at least one seed")
    if options.synthetic == (options.catalog is not None):
        raise ConfigError("give either --catalog CATALOG --cache CACHE or --synthetic")
    if options.catalog is not None and options.cache is None:
        raise ConfigError("--catalog needs --cache (its prepared cache; prepared here if missing)")
    if options.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {options.threads}")
    if options.bootstrap_samples < 1:
        raise ConfigError(f"--bootstrap-samples must be at least 1, got {options.bootstrap_samples}")
    if options.deadline is not None:
        _deadline(options.deadline)
    if options.summary_into is not None:
        report.read_summary(options.summary_into)


def user_layer(options: BenchmarkOptions) -> dict[str, Any]:
    """Preset, recipe and explicit flags merged (what the user chose; no per-run keys)."""
    layer: dict[str, Any] = {}
    if options.preset:
        layer = {k: v for k, v in load_preset(options.preset).items() if k not in RUN_KEYS}
    if options.recipe is not None:
        recipe = read_yaml(options.recipe)
        if "preset" in recipe:
            preset = {k: v for k, v in load_preset(str(recipe.pop("preset"))).items() if k not in RUN_KEYS}
            layer = deep_merge(layer, preset)
        clash = [k for k in RUN_KEYS if k in recipe]
        if isinstance(recipe.get("model"), dict) and "architecture" in recipe["model"]:
            clash.append("model.architecture")
        if clash:
            raise ConfigError(
                f"{options.recipe}: {', '.join(clash)} are set by hermes benchmark (rows, seeds, budget rule); "
                "remove them from the recipe"
            )
        layer = deep_merge(layer, recipe)
    flags: dict[str, Any] = {}
    if options.preset_size is not None:
        flags["model"] = {"preset": options.preset_size}
    data: dict[str, Any] = {}
    if options.patch is not None:
        data["patch_size"] = [options.patch] * 3
    if options.batch is not None:
        data["batch_size"] = options.batch
    if options.val_fraction is not None:
        data["val_fraction"] = options.val_fraction
    if data:
        flags["data"] = data
    if options.lr is not None:
        flags["optim"] = {"lr": options.lr}
    return deep_merge(layer, flags)


def run_config(run: Run, layer: dict[str, Any], catalog: Path, cache: Path, output: Path,
               loader_workers: int) -> dict[str, Any]:
    """The TrainConfig dict of one run (see the module docstring for the priorities)."""
    steps = run.steps
    per_run_defaults = {
        "checkpoint_every": max(25, steps // 4),
        "optim": {"warmup_steps": min(50, max(1, steps // 10))},
        "validation": {"every_steps": steps},  # once, at the end: final_weights "best" needs it
    }
    config = deep_merge(deep_merge(BENCH_DEFAULTS, per_run_defaults), layer)
    config = deep_merge(config, {"data": {"num_workers": loader_workers}})  # batches do not depend on it
    identity: dict[str, Any] = {
        "catalog": str(catalog),
        "cache": str(cache),
        "output": str(output),
        "paradigm": run.row.paradigm,
        "seed": run.seed,
        "steps": steps,
        "model": dict(run.row.model),
    }
    if run.dataset is not None:
        identity["dataset"] = run.dataset
    return deep_merge(config, identity)


def plan_runs(options: BenchmarkOptions, train_datasets: Sequence[str], test_datasets: Sequence[str]) -> list[Run]:
    """Seed-major order, so a complete comparison (every row of one seed) comes early."""
    n = len(train_datasets)
    runs: list[Run] = []
    for seed in options.seeds:
        for key in options.models:
            row = MODELS[key]
            if row.paradigm == "universal":
                steps = options.steps * (n if options.budget_rule == "equal_total_compute" else 1)
                runs.append(Run(row, None, seed, steps, tuple(test_datasets)))
            else:
                runs.extend(Run(row, d, seed, options.steps, (d,)) for d in test_datasets)
    return runs


def settings(options: BenchmarkOptions, layer: dict[str, Any], datasets: dict[str, Any]) -> dict[str, Any]:
    """What makes two invocations' runs comparable (seeds, models, threads... may differ)."""
    return json_safe({
        "steps_per_dataset": options.steps,
        "budget_rule": options.budget_rule,
        "recipe": layer,
        "evaluation": {"overlap": options.overlap, "max_test_cases": options.max_test_cases},
        "data": datasets,
    })


def check_settings(work: Path, current: dict[str, Any]) -> None:
    path = work / SETTINGS_FILE
    if not path.exists():
        atomic_write_json(path, current)
        return
    saved = json.loads(path.read_text())
    if saved != current:
        diffs = _differences(saved, current)
        raise ConfigError(
            f"{work} holds runs made with other settings ({'; '.join(diffs[:4])}); use another --work "
            f"(or the same settings as {path})"
        )


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out.extend(_differences(old.get(key), new.get(key), f"{where}.{key}" if where else key))
        return out
    return [] if old == new else [f"{where}: {old!r} there, {new!r} now"]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An advisory lock (released when the process ends, even when killed); yields whether it
    was acquired (always True when blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_data(options: BenchmarkOptions, work: Path) -> tuple[Path, Path]:
    """The catalog and prepared cache (synthetic: generated here once; a catalog's cache is
    prepared only if it has none). Locked, so two processes on one WORK prepare it once."""
    from hermes.data.cache import prepare_cache
    from hermes.data.catalog import default_catalog_spec, load_catalog

    params: dict[str, Any] = {}
    with file_lock(work / ".data.lock"):
        if options.synthetic:
            from hermes.synthetic import generate_cohort

            params = {"datasets": list(options.synthetic_datasets), "cases": options.cases,
                      "test_cases": options.test_cases, "seed": options.data_seed, "scale": options.scale}
            params_file = work / "cohort.json"
            if params_file.exists() and json.loads(params_file.read_text()) != params:
                raise ConfigError(
                    f"{work} holds a synthetic cohort made with {params_file.read_text().strip()}; "
                    "use another --work for other --synthetic-datasets/--cases/--test-cases/--data-seed/--scale"
                )
            folders = generate_cohort(work / "cohort", seed=options.data_seed, scale=options.scale,
                                      datasets=options.synthetic_datasets, cases=options.cases,
                                      test_cases=options.test_cases, progress=False)
            atomic_write_json(params_file, params)
            catalog = work / "catalog.yaml"
            if not catalog.exists():
                atomic_write_text(catalog, yaml.safe_dump(default_catalog_spec(folders)))
            cache = work / "cache"
        else:
            assert options.catalog is not None and options.cache is not None
            catalog, cache = options.catalog.resolve(), options.cache.resolve()
            if not catalog.is_file():
                raise ConfigError(f"--catalog {catalog}: file not found")
        # A synthetic cache is remade when its cohort was (a marker with the cohort's parameters);
        # a catalog's own cache is prepared only when it has none (the trainer checks it matches).
        marker = cache / ".benchmark_cohort.json"
        stale = options.synthetic and (not marker.is_file() or json.loads(marker.read_text()) != params)
        if not (cache / "cache.json").is_file() or stale:
            log(f"preparing {catalog} -> {cache}")
            start = time.perf_counter()
            result = prepare_cache(load_catalog(catalog), cache, workers=options.prepare_workers, progress=False)
            log(f"prepared: {result.summary()} in {time.perf_counter() - start:.0f} s")
            if options.synthetic:
                atomic_write_json(marker, params)
    return catalog, cache


# --------------------------------------------------------------------------------------------
# One run: train + evaluate
# --------------------------------------------------------------------------------------------
def execute(run: Run, run_dir: Path, config: TrainConfig, options: BenchmarkOptions, catalog: Path) -> dict[str, Any]:
    """Train (or resume) and evaluate one run; returns its result (written by the caller)."""
    from hermes.bundle import ModelBundle, TrainingRecord, is_model_folder
    from hermes.config import EvaluationConfig, InferenceConfig
    from hermes.evaluation.evaluate import evaluate_model
    from hermes.training.checkpoint import checkpoint_path
    from hermes.training.trainer import train

    out = Path(config.output)
    model_dir = out / "model"
    timing_file = run_dir / "train_timing.json"
    if not is_model_folder(model_dir) or not timing_file.exists():
        resume = checkpoint_path(out).exists()
        if out.exists() and not resume:
            shutil.rmtree(out)  # an attempt killed before its first checkpoint (this benchmark's folder)
        start = time.perf_counter()
        trained = train(config, resume=resume, progress=options.progress)
        atomic_write_json(timing_file, {"train_wall_s": time.perf_counter() - start, "resumed": resume,
                                        "steps": trained.steps})
    timing = json.loads(timing_file.read_text())
    start = time.perf_counter()
    evaluation = evaluate_model(
        model_dir, catalog, split="test", datasets=list(run.eval_datasets), device=options.device,
        progress=False, max_cases=options.max_test_cases, inference=InferenceConfig(overlap=options.overlap),
        config=EvaluationConfig(bootstrap_samples=0, workers=1),
    )
    eval_wall = time.perf_counter() - start
    training = ModelBundle.load(model_dir).training or TrainingRecord()
    datasets = {
        name: {
            "n_cases": entry["n_cases"],
            **{m: entry["mean"][m]["mean"] for m in report.METRICS},
            "tasks": {task: {m: stats[m]["mean"] for m in report.METRICS} for task, stats in entry["tasks"].items()},
        }
        for name, entry in evaluation.summary["datasets"].items()
    }
    return {
        "model": run.row.key,
        "label": run.row.label,
        "paradigm": run.row.paradigm,
        "dataset": run.dataset,
        "seed": run.seed,
        "budget_rule": options.budget_rule,
        "planned_steps": run.steps,
        "steps": int(training.steps if training.steps is not None else timing["steps"]),
        "final_weights": training.final_weights,
        "validation_dice_by_weights": training.validation_dice_by_weights or {},
        "parameters": _parameters(model_dir),
        "train_wall_s": timing["train_wall_s"],
        "resumed": timing["resumed"],
        "median_steps_per_s": _steps_per_s(out / "train_log.csv"),
        "eval_wall_s": eval_wall,
        "eval_cases": len({(r["dataset"], r["case"]) for r in evaluation.rows}),
        "datasets": datasets,
        "cases": [{k: r[k] for k in ("dataset", "case", "task", *report.METRICS)} for r in evaluation.rows],
        "config": config.model_dump(mode="json"),
    }


def _parameters(model_dir: Path) -> int:
    from hermes.models.registry import count_parameters, load_model

    model, _ = load_model(model_dir)
    return count_parameters(model)


def _steps_per_s(csv_path: Path) -> float | None:
    """Median of the logged training speed (the logger's steps_per_s per logging window)."""
    if not csv_path.exists():
        return None
    lines = csv_path.read_text().splitlines()
    if len(lines) < 2 or "steps_per_s" not in lines[0].split(","):
        return None
    col = lines[0].split(",").index("steps_per_s")
    values = [float(parts[col]) for parts in (line.split(",") for line in lines[1:]) if len(parts) > col and parts[col]]
    return float(np.median(values)) if values else None


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def run_benchmark(options: BenchmarkOptions) -> int:
    """Train and evaluate every planned run (resumable), then write the tables; returns the
    exit code (1 when a run failed: the others still ran and the tables were written)."""
    import torch

    from hermes.data.catalog import load_catalog

    check_options(options)
    layer = user_layer(options)
    # A bad recipe key fails here, before any data is generated or prepared.
    validate(TrainConfig, deep_merge(deep_merge(BENCH_DEFAULTS, layer), {"catalog": ".", "cache": ".", "output": "."}),
             str(options.recipe or options.preset or "hermes benchmark"))
    torch.set_num_threads(options.threads)
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = (options.out or work).resolve()
    catalog_path, cache = prepare_data(options, work)
    catalog = load_catalog(catalog_path)
    trainable = [e for e in catalog.datasets if not e.test_only and e.num_train > 0]
    train_datasets = [e.name for e in trainable]
    test_datasets = [e.name for e in trainable if e.num_test > 0]
    if not test_datasets:
        raise ConfigError(f"{catalog_path}: no dataset has both training and test cases")
    data_info = {e.name: {"train": e.num_train, "test": e.num_test} for e in trainable}
    check_settings(work, settings(options, layer, data_info))

    runs = plan_runs(options, train_datasets, test_datasets)
    configs = [  # every config error before any training
        validate(TrainConfig, run_config(run, layer, catalog_path, cache, run.folder(work) / "train",
                                         options.loader_workers), f"{options.recipe or 'hermes benchmark'} ({run.name()})")
        for run in runs
    ]
    first = configs[0]
    meta = {
        "title": options.title or f"{'Synthetic cohort' if options.synthetic else catalog_path.name}: universal vs "
        f"per-dataset training, {options.steps} steps per dataset ({options.budget_rule.replace('_', ' ')})",
        "data_name": options.data_name or ("synthetic" if options.synthetic else catalog_path.parent.name),
        "catalog": str(catalog_path),
        "budget_rule": options.budget_rule,
        "steps": options.steps,
        "universal_steps": options.steps * (len(train_datasets) if options.budget_rule == "equal_total_compute" else 1),
        "n_train_datasets": len(train_datasets),
        "batch": first.data.batch_size,
        "patch": "x".join(map(str, first.data.patch_size)),
        "model_preset": first.model.preset,
        "val_fraction": first.data.val_fraction,
        "recipe_text": _recipe_text(options, layer),
        "recipe": layer,
        "overlap": options.overlap,
        "test_cases": "all test cases of each dataset"
        + (f", at most {options.max_test_cases}" if options.max_test_cases else ""),
        "nsd_tolerance_mm": 2.0,
        "command": options.command,
        "torch": torch.__version__,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    pairs = options.compare if options.compare is not None else DEFAULT_PAIRS
    rule = f"each per-dataset model {options.steps} steps, each universal model {meta['universal_steps']} steps"
    log(f"{len(runs)} runs over {len(test_datasets)} datasets ({', '.join(test_datasets)}); budget rule "
        f"{options.budget_rule}: {rule}")

    deadline = _deadline(options.deadline)
    failures: list[str] = []
    pending_steps = sum(r.steps for r in runs if not (r.folder(work) / report.RESULT_FILE).exists())
    done_steps, spent, started = 0, 0.0, time.perf_counter()
    for index, (run, config) in enumerate(zip(runs, configs), start=1):
        run_dir = run.folder(work)
        name = f"({index}/{len(runs)}) {run.name()}"
        if (run_dir / report.RESULT_FILE).exists():
            log(f"{name}: done earlier, skipped")
            continue
        if options.report_only:
            log(f"{name}: not trained (--report-only)")
            continue
        if deadline is not None and datetime.datetime.now() > deadline:
            log(f"{name}: not started (past the deadline {options.deadline})")
            continue
        with file_lock(run_dir / ".lock", blocking=False) as mine:
            if not mine:
                log(f"{name}: running in another process, skipped")
                pending_steps -= run.steps
                continue
            if (run_dir / report.RESULT_FILE).exists():  # finished by another process meanwhile
                log(f"{name}: done by another process, skipped")
                pending_steps -= run.steps
                continue
            eta = _eta(started, spent, done_steps, pending_steps)
            log(f"{name}: training {run.steps} steps + evaluation{eta}")
            start = time.perf_counter()
            try:
                result = execute(run, run_dir, config, options, catalog_path)
            except Exception as error:  # one failed run must not stop a long background benchmark
                message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
                failures.append(f"{run.row.key} {run.dataset or 'universal'} seed {run.seed}: "
                                f"{type(error).__name__}: {message}")
                log(f"{name}: FAILED ({failures[-1]}); continuing")
                atomic_write_text(run_dir / "error.txt", f"{type(error).__name__}: {error}\n")
                pending_steps -= run.steps
                continue
            atomic_write_json(run_dir / report.RESULT_FILE, json_safe(result))
        elapsed = time.perf_counter() - start
        spent += elapsed
        done_steps += run.steps
        pending_steps -= run.steps
        dice = " ".join(f"{d}={v['dice']:.3f}" for d, v in result["datasets"].items() if v["dice"] is not None)
        log(f"{name}: done in {elapsed:.0f} s (train {result['train_wall_s']:.0f} s, eval "
            f"{result['eval_wall_s']:.0f} s, weights {result['final_weights']}); Dice {dice}"
            f"{_eta(started, spent, done_steps, pending_steps)}")
        write_outputs(out, work, test_datasets, meta, pairs, options)
    md = write_outputs(out, work, test_datasets, meta, pairs, options, final=True)
    log(f"table: {md}")
    for failure in failures:
        log(f"failed: {failure}")
    print(md.read_text(), flush=True)
    return 1 if failures else 0


def write_outputs(out: Path, work: Path, datasets: list[str], meta: dict[str, Any],
                  pairs: Sequence[tuple[str, str]], options: BenchmarkOptions, final: bool = False) -> Path:
    """paradigm.json / paradigm.md / summary.json from every result under WORK; ``final``: also
    merge the comparisons into ``--summary-into`` (once per invocation, at the end)."""
    results = report.collect(work)
    present = {r["model"] for r in results}
    table = report.aggregate(results, datasets, [key for key in MODELS if key in present])
    comparisons = report.compare(results, datasets, pairs, meta, options.bootstrap_samples, options.bootstrap_seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "paradigm.json", json_safe({
        "meta": meta, "datasets": datasets, "table": table, "comparisons": comparisons,
        "runs": [{k: v for k, v in r.items() if k != "cases"} for r in results],
    }))
    atomic_write_json(out / "summary.json", {"comparisons": comparisons})
    if final and options.summary_into is not None and comparisons:
        report.merge_summary(options.summary_into, comparisons)
    md = out / "paradigm.md"
    atomic_write_text(md, report.markdown(table, datasets, meta, comparisons))
    return md


def _recipe_text(options: BenchmarkOptions, layer: dict[str, Any]) -> str:
    parts = []
    if options.preset:
        parts.append(f"preset `{options.preset}`")
    if options.recipe is not None:
        parts.append(f"recipe `{options.recipe}`")
    shown = json.dumps(json_safe(layer), sort_keys=True)
    parts.append(f"overrides of the benchmark defaults `{shown}`" if layer else "the benchmark defaults")
    return ", ".join(parts)


def _eta(started: float, spent: float, done_steps: int, pending_steps: int) -> str:
    """Elapsed time of this invocation and the time left, from the seconds per training step
    of the runs it finished (evaluation included)."""
    text = f"; elapsed {(time.perf_counter() - started) / 60:.1f} min"
    if done_steps <= 0 or pending_steps <= 0:
        return text
    seconds = spent / done_steps * pending_steps
    finish = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
    return f"{text}, ETA {seconds / 60:.0f} min (about {finish:%H:%M})"


def _deadline(text: str | None, now: datetime.datetime | None = None) -> datetime.datetime | None:
    """The next HH:MM after ``now``: a run started at 23:20 with ``--deadline 00:20`` has an hour."""
    if not text:
        return None
    now = now or datetime.datetime.now()
    try:
        hour, minute = (int(x) for x in text.split(":"))
        moment = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError:
        raise ConfigError(f"--deadline {text!r}: expected HH:MM") from None
    return moment if moment > now else moment + datetime.timedelta(days=1)


def command_line() -> str:
    return " ".join(["hermes", *sys.argv[1:]]) if sys.argv else "hermes benchmark"
