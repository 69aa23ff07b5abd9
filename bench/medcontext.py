"""MedContext on the synthetic cohort: few-shot test Dice with and without it, its cost, and an
ablation grid.

Few-shot benchmark. For each number of training cases per dataset (``--shots``) and each seed
(``--seeds``), the same model trains twice for the same number of steps: once as the baseline
and once with ``medcontext.enabled``. The two configs differ only in the ``medcontext``
section. Each model is then scored on the cohort's test cases (mean Dice over datasets,
oracle prompts, ``hermes.evaluation.evaluate_model``).

* A synthetic case depends only on (seed, dataset, split, index), so the 3-shot training set
  is the first half of the 6-shot one, and every run sees the same test cases.
* No validation hold-out: every run uses all of its few training cases and is scored with its
  final EMA weights, so nothing is selected on the test set.

Cost. Median wall time of the trainer's own ``train_step`` (plus EMA / teacher updates) with
and without MedContext, on the same model and batch, interleaved so that machine load hits
both alike. A fresh subprocess per variant gives the peak resident memory.

Ablation grid (``--grid FILE``, see bench/medcontext_grid.py for the file format). Every arm
of the file is a MedContext variant; the baseline without MedContext is trained once per
(shots, seed) and shared by all arms. ``--equal-time`` also trains a baseline for
``round(steps * r)`` steps, where r is the MedContext / baseline step-time ratio (measured once
with the cost code and kept in ``WORK/time_ratio.json``, or given with ``--time-ratio``), and
the report compares every arm with both baselines: arm minus baseline, paired by seed and test
case, with a bootstrap 95 % interval over seeds and test cases. Grid runs use
``num_workers: 0`` (a loader worker competes for the cores with the training process).

    .venv/bin/python bench/medcontext.py --out docs/bench/medcontext.md
    .venv/bin/python bench/medcontext.py --cost-only          # just the per-step cost
    OMP_NUM_THREADS=1 .venv/bin/python bench/medcontext.py --grid bench/medcontext_grid.yaml \
        --work runs/mcgrid --shots 3 --steps 300 --seeds 0 1 2 --equal-time --out docs/bench/medcontext_grid.md

Runs are resumable: results go to ``WORK/results.jsonl`` and finished runs are skipped (grid
runs by a key of the settings, shots, seed, arm name and the arm's resolved config, so a
changed arm trains again).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import medcontext_grid as grid  # bench/medcontext_grid.py (this script's folder is on sys.path)
import torch
import yaml
from tqdm.auto import tqdm

from hermes.config import LossConfig, MedContextConfig, ModelConfig, OptimConfig
from hermes.fileio import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
# Short names of the cohort's lesion tasks: context cannot predict a lesion under the mask, so
# they are supervised on visible voxels only (docs/medcontext.md, "Lesions").
LESION_SHORT_NAMES = ("liver_tumour", "kidney_tumour", "lesion")
VARIANTS = ("baseline", "medcontext")
LOG_EVERY = 10  # train_log.csv rows every 10 steps


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hermes", "bench"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted changes in hermes/ or bench/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# Per-step cost
# ----------------------------------------------------------------------------------------------
def _cost_setup(args: argparse.Namespace, medcontext: bool) -> dict[str, Any]:
    from hermes.models.registry import build_model
    from hermes.runtime import resolve_amp
    from hermes.training.ema import ModelEMA
    from hermes.training.loss import HermesLoss
    from hermes.training.medcontext import MedContext
    from hermes.training.optim import build_optimizer

    torch.manual_seed(0)
    tasks, patch, batch = args.cost_tasks, list(args.patch), 2
    names = [f"D/t{i}" for i in range(tasks)]
    model_config = ModelConfig(architecture=args.architecture, preset="tiny")
    amp = resolve_amp(args.precision, "auto", torch.device("cpu"))
    model = build_model(model_config, num_tasks=tasks, num_modalities=3, patch_size=patch)
    if amp.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    image = torch.randn(batch, 1, *patch)
    if amp.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    data = {
        "image": image,
        "target": (torch.rand(batch, tasks, *patch) > 0.8).float(),
        "task_ids": torch.arange(tasks).repeat(batch, 1),
        "task_mask": torch.ones(batch, tasks, dtype=torch.bool),
        "modality_id": torch.zeros(batch, dtype=torch.long),
    }
    mc_config = MedContextConfig(enabled=True, mask_patch=list(args.mask_patch))
    return {
        "model": model,
        "batch": data,
        "amp": amp,
        "loss": HermesLoss(LossConfig()),
        "optimizer": build_optimizer(model, OptimConfig()),
        "ema": ModelEMA(model, 0.99),
        "mc": MedContext(mc_config, model, names) if medcontext else None,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _one_step(state: dict[str, Any], step: int) -> float:
    from hermes.training.step import medcontext_generator, train_step

    mc = state["mc"]
    start = time.perf_counter()
    generator = medcontext_generator(0, 0, step) if mc is not None else None
    train_step(
        state["model"],
        state["batch"],
        state["loss"],
        state["optimizer"],
        state["amp"],
        None,
        1.0,
        mc,
        generator,
        step,
    )
    state["ema"].update(state["model"], step)
    if mc is not None:
        mc.update_teacher(state["model"], step)
    return time.perf_counter() - start


def saved_activation_mb(state: dict[str, Any], step: int) -> float:
    """Bytes of the tensors autograd keeps for backward during one training step.

    Counted exactly (unique storages) through ``saved_tensors_hooks``, so unlike process memory
    it is independent of the allocator and of oneDNN's caches: it is the activation memory
    that grows with batch and patch size, the part MedContext doubles.
    """
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _one_step(state, step)
    return sum(seen.values()) / 2**20


def measure_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved step times (both variants in one process) plus per-part times."""
    states = {v: _cost_setup(args, v == "medcontext") for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    total = args.cost_warmup + args.cost_steps
    for step in tqdm(range(total), desc="cost", unit="step pair"):
        for variant in VARIANTS if step % 2 == 0 else VARIANTS[::-1]:
            elapsed = _one_step(states[variant], step)
            if step >= args.cost_warmup:
                times[variant].append(elapsed)
    # Parts of the MedContext overhead that are not network passes.
    state = states["medcontext"]
    mc, data = state["mc"], state["batch"]
    parts: dict[str, list[float]] = {"mask": [], "teacher_forward": [], "teacher_update": []}
    for step in range(args.cost_steps):
        t0 = time.perf_counter()
        mc.mask(data["image"], torch.Generator().manual_seed(step))
        t1 = time.perf_counter()
        with state["amp"].autocast():
            mc.teacher_probabilities(data["image"], data["task_ids"], data["modality_id"], data["task_mask"])
        t2 = time.perf_counter()
        mc.update_teacher(state["model"], 1000 + step)
        t3 = time.perf_counter()
        parts["mask"].append(t1 - t0)
        parts["teacher_forward"].append(t2 - t1)
        parts["teacher_update"].append(t3 - t2)
    memory = {v: _peak_memory_subprocess(args, v) for v in VARIANTS}
    activations = {v: saved_activation_mb(states[v], total) for v in VARIANTS}
    return {
        "activations_mb": activations,
        "median_s": {v: statistics.median(t) for v, t in times.items()},
        "parts_s": {k: statistics.median(v) for k, v in parts.items()},
        "peak_rss_mb": memory,
        "teacher_mb": sum(t.numel() * t.element_size() for t in mc.teacher.state_dict().values()) / 2**20,
        "params": state["params"],
        "precision": state["amp"].name,
        "channels_last": state["amp"].channels_last,
    }


def _peak_memory_subprocess(args: argparse.Namespace, variant: str) -> float:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-worker",
        variant,
        "--architecture",
        args.architecture,
        "--precision",
        args.precision,
        "--cost-tasks",
        str(args.cost_tasks),
        "--patch",
        *map(str, args.patch),
        "--mask-patch",
        *map(str, args.mask_patch),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def memory_worker(args: argparse.Namespace) -> None:
    state = _cost_setup(args, args.memory_worker == "medcontext")
    for step in range(3):
        _one_step(state, step)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# ----------------------------------------------------------------------------------------------
# Few-shot benchmark
# ----------------------------------------------------------------------------------------------
def prepare_shots(work: Path, shots: int, args: argparse.Namespace) -> tuple[Path, Path]:
    """Cohort with ``shots`` training cases per dataset, its catalog and its cache."""
    from hermes.data.cache import prepare_cache
    from hermes.data.catalog import default_catalog_spec, load_catalog
    from hermes.synthetic import generate_cohort

    root = work / f"cohort_{shots}shot"
    folders = generate_cohort(
        root, seed=args.cohort_seed, scale=args.scale, cases=shots, test_cases=args.test_cases, progress=False
    )
    catalog_path = root / "catalog.yaml"
    spec = default_catalog_spec(folders, relative_to=root)
    atomic_write_text(catalog_path, yaml.safe_dump(spec, sort_keys=False))
    cache = work / f"cache_{shots}shot"
    prepare_cache(load_catalog(catalog_path), cache, workers=1, progress=False)
    return catalog_path, cache


def bench_medcontext(args: argparse.Namespace, task_names: list[str]) -> dict[str, Any]:
    """The bench's MedContext settings: config defaults except the mask cell and the lesions."""
    lesions = [n for n in task_names if n.rsplit("/", 1)[-1] in LESION_SHORT_NAMES]
    return {"enabled": True, "mask_patch": list(args.mask_patch), "exclude_tasks": lesions}


def run_config(
    catalog: Path,
    cache: Path,
    output: Path,
    seed: int,
    steps: int,
    args: argparse.Namespace,
    medcontext: dict[str, Any] | None,
    num_workers: int = 1,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "catalog": str(catalog),
        "cache": str(cache),
        "output": str(output),
        "seed": seed,
        "steps": steps,
        "precision": args.precision,
        "checkpoint_every": steps,
        "log_every": LOG_EVERY,
        "model": {"architecture": args.architecture, "preset": "tiny"},
        "data": {
            "patch_size": list(args.patch),
            "batch_size": 2,
            "num_workers": num_workers,
            "val_fraction": 0.0,
            "val_min_cases": 0,
        },
        "validation": {"every_steps": steps + 1},
        "optim": {"warmup_steps": min(50, steps // 10)},
    }
    if medcontext is not None:
        config["medcontext"] = dict(medcontext)
    return config


def train_and_score(config_path: Path) -> dict[str, Any]:
    from hermes.config import load_train_config
    from hermes.evaluation.evaluate import evaluate_model
    from hermes.training.trainer import train

    config = load_train_config(config_path)
    start = time.perf_counter()
    result = train(config, progress=False)
    train_s = time.perf_counter() - start
    evaluation = evaluate_model(result.model_dir, config.catalog, split="test", device="cpu", progress=False)
    eval_s = time.perf_counter() - start - train_s
    summary = evaluation.summary
    # Training speed and loss terms from the trainer's own log (excludes set-up and saving).
    with (result.output / "train_log.csv").open() as handle:
        log_rows = [
            {k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)
        ]
    seconds, previous = 0.0, 0.0
    for row in log_rows:
        seconds += (row["step"] - previous) / row["steps_per_s"]
        previous = row["step"]
    tail = log_rows[-max(1, len(log_rows) // 5) :]  # last 20 % of the run
    terms = {
        k: statistics.fmean(r[k] for r in tail)
        for k in ("seg", "masked_supervised", "consistency")
        if k in tail[0]
    }
    return {
        "dice": summary["overall"]["mean_over_datasets"]["dice"],
        "dice_per_dataset": {name: d["mean"]["dice"]["mean"] for name, d in summary["datasets"].items()},
        "train_s": train_s,
        "eval_s": eval_s,
        "step_s": seconds / max(previous, 1.0),
        "final_terms": terms,
        "log": grid.log_summary(log_rows),
        # per test case and task, for paired bootstraps (NaN Dice: reference and prediction empty)
        "cases": [
            {"dataset": r["dataset"], "case": str(r["case"]), "task": r["task"],
             "dice": None if math.isnan(float(r["dice"])) else float(r["dice"])}
            for r in evaluation.rows
            if r.get("annotated", True)
        ],
    }


def append_row(results_path: Path, row: dict[str, Any]) -> None:
    """results.jsonl is an append-only log, one line per finished run (resume reads it). One
    ``write`` on an O_APPEND descriptor, so that two bench processes on one WORK (different
    ``--arms`` or ``--seeds``, one per core) never interleave their lines."""
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{results_path}: short append ({written} of {len(data)} bytes)")
    finally:
        os.close(fd)


def fewshot(args: argparse.Namespace) -> list[dict[str, Any]]:
    from hermes.data.catalog import load_catalog

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.jsonl"
    done: dict[tuple[int, int, str], dict[str, Any]] = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            if "grid_key" in row:  # a --grid run
                continue
            if row["steps"] == args.steps and row["patch"] == list(args.patch) and row["scale"] == args.scale:
                done[(row["shots"], row["seed"], row["variant"])] = row
    jobs = [(s, seed, v) for s in args.shots for seed in args.seeds for v in VARIANTS]
    bar = tqdm(total=len(jobs), desc="few-shot runs", unit="run")
    rows = []
    for shots in args.shots:
        catalog, cache = prepare_shots(work, shots, args)
        task_names = load_catalog(catalog).task_names
        for seed in args.seeds:
            for variant in VARIANTS:
                key = (shots, seed, variant)
                if key in done:
                    rows.append(done[key])
                    bar.update(1)
                    continue
                run_dir = work / f"runs/{shots}shot_seed{seed}_{variant}_{args.steps}steps"
                if run_dir.exists():  # an interrupted run: start it again from scratch
                    shutil.rmtree(run_dir)
                config_path = work / f"configs/{run_dir.name}.yaml"
                medcontext = bench_medcontext(args, task_names) if variant == "medcontext" else None
                config = run_config(catalog, cache, run_dir, seed, args.steps, args, medcontext)
                atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
                bar.set_postfix_str(run_dir.name)
                row = {
                    "shots": shots,
                    "seed": seed,
                    "variant": variant,
                    "steps": args.steps,
                    "patch": list(args.patch),
                    "scale": args.scale,
                    **train_and_score(config_path),
                }
                append_row(results_path, row)
                rows.append(row)
                bar.update(1)
    bar.close()
    return rows


# ----------------------------------------------------------------------------------------------
# Ablation grid
# ----------------------------------------------------------------------------------------------
TIME_RATIO_FILE = "time_ratio.json"


def grid_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The bench settings every grid run shares (part of each run's resume key)."""
    return {
        "architecture": args.architecture,
        "precision": args.precision,
        "patch": list(args.patch),
        "scale": args.scale,
        "cohort_seed": args.cohort_seed,
        "test_cases": args.test_cases,
        "batch_size": 2,
        "num_workers": 0,
    }


def term_gradients_every(steps: int) -> int:
    """About steps / 20, rounded to a multiple of the logging interval: the last 20 % of the run
    then holds three or four gradient-share measurements (the config default, every 100 steps,
    leaves none there in a 300-step run), and the log windows between them time clean steps."""
    return LOG_EVERY * max(1, round(steps / 20 / LOG_EVERY))


def grid_medcontext(args: argparse.Namespace, task_names: list[str]) -> dict[str, Any]:
    """What every arm starts from: the bench's MedContext settings and `term_gradients_every`."""
    return {**bench_medcontext(args, task_names), "term_gradients_every": term_gradients_every(args.steps)}


def time_ratio(args: argparse.Namespace, work: Path) -> tuple[float, str, dict[str, Any] | None]:
    """(MedContext / baseline step-time ratio, where it comes from, the cost measurement or None).

    ``--time-ratio`` wins. Otherwise the ratio is measured once with the cost code (default
    ``MedContextConfig``, the bench's mask cell) and kept in WORK/time_ratio.json, so a resumed
    grid keeps its equal-time baseline instead of re-measuring a slightly different ratio and
    training another one.
    """
    if args.time_ratio is not None:
        return args.time_ratio, "given with `--time-ratio`", None
    setting = {"architecture": args.architecture, "precision": args.precision, "patch": list(args.patch),
               "mask_patch": list(args.mask_patch), "cost_tasks": args.cost_tasks}
    path = work / TIME_RATIO_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["setting"] == setting:
            return stored["ratio"], f"measured on {stored['date']} with the cost code (kept in WORK/{TIME_RATIO_FILE})", \
                stored["cost"]
    cost = measure_cost(args)
    ratio = cost["median_s"]["medcontext"] / cost["median_s"]["baseline"]
    atomic_write_json(path, {"ratio": ratio, "setting": setting, "date": datetime.date.today().isoformat(),
                             "cost": cost})
    return ratio, f"measured at the start of the grid with the cost code (kept in WORK/{TIME_RATIO_FILE})", cost


def grid_jobs(
    args: argparse.Namespace, work: Path, arms: dict[str, dict[str, Any]], equal_time_steps: int | None
) -> list[dict[str, Any]]:
    """Every run of the grid, in order: per shots and seed, the baseline(s), then the arms."""
    from hermes.data.catalog import load_catalog

    settings = grid_settings(args)
    jobs = []
    for shots in args.shots:
        catalog, cache = prepare_shots(work, shots, args)
        defaults = grid_medcontext(args, load_catalog(catalog).task_names)
        baseline_steps = sorted({args.steps, equal_time_steps or args.steps})
        for seed in args.seeds:
            runs: list[tuple[str, int, dict[str, Any] | None]] = [(grid.BASELINE, n, None) for n in baseline_steps]
            runs += [(name, args.steps, grid.resolve_arm(o, defaults, args.steps)) for name, o in arms.items()]
            for arm, steps, medcontext in runs:
                key = grid.run_key(settings, shots, seed, arm, steps, medcontext)
                jobs.append({"key": key, "catalog": catalog, "cache": cache})
    return jobs


def run_grid(
    args: argparse.Namespace, arms: dict[str, dict[str, Any]], equal_time_steps: int | None, code_version: str
) -> list[dict[str, Any]]:
    work = args.work.resolve()
    results_path = work / "results.jsonl"
    jobs = grid_jobs(args, work, arms, equal_time_steps)
    done = grid.finished_runs(results_path)
    finished = sum(grid.key_id(job["key"]) in done for job in jobs)
    # `initial`: runs finished earlier count as done, so the rate and ETA are those of this session
    bar = tqdm(total=len(jobs), initial=finished, desc="grid runs", unit="run", smoothing=0.1)
    rows = []
    for job in jobs:
        key, kid = job["key"], grid.key_id(job["key"])
        if kid in done:
            rows.append(done[kid])
            continue
        name = f"{key['shots']}shot_seed{key['seed']}_{key['arm']}_{key['steps']}steps_{kid}"
        run_dir = work / "grid_runs" / name
        if run_dir.exists():  # an interrupted run: start it again from scratch
            shutil.rmtree(run_dir)
        config = run_config(job["catalog"], job["cache"], run_dir, key["seed"], key["steps"], args,
                            key["medcontext"], num_workers=0)
        config_path = work / f"grid_configs/{name}.yaml"
        atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
        bar.set_postfix_str(name)
        row = {
            "grid_key": key,
            "arm": key["arm"],
            "shots": key["shots"],
            "seed": key["seed"],
            "steps": key["steps"],
            "commit": code_version,
            **train_and_score(config_path),
        }
        append_row(results_path, row)
        rows.append(row)
        bar.update(1)
    bar.close()
    return rows


def grid_section(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    arms: dict[str, dict[str, Any]],
    equal_time: tuple[int, float, str] | None,
) -> list[str]:
    """The report's grid part: settings, then per shots and budget view one table of arms."""
    every = term_gradients_every(args.steps)
    arm_list = "; ".join(f"`{name}` {json.dumps(o) if o else '(bench settings)'}" for name, o in arms.items())
    lines = [
        "## MedContext ablation grid (few-shot test Dice, synthetic cohort)",
        "",
        f"- grid file: `{args.grid}`; arms: {arm_list}",
        f"- cohort: `hermes.synthetic` (7 datasets, CT/MR/PET), scale {args.scale}, cohort seed "
        f"{args.cohort_seed}, {args.test_cases} test cases per dataset",
        f"- model: `{args.architecture}` tiny, patch {'×'.join(map(str, args.patch))}, batch 2, {args.steps} steps, "
        f"precision {args.precision}, LAMB (defaults), `num_workers: 0`, no validation hold-out, final EMA "
        "weights scored",
        f"- every arm: MedContext with `mask_patch` {list(args.mask_patch)}, the lesion tasks "
        f"({', '.join(LESION_SHORT_NAMES)}) in `exclude_tasks`, `term_gradients_every` {every}, and the "
        "arm's overrides; other keys at their `MedContextConfig` defaults",
        f"- seeds {', '.join(map(str, args.seeds))} (training seed: weights, batches, masks); the baseline "
        "(no MedContext) is trained once per shots and seed and shared by all arms",
    ]
    if equal_time is not None:
        steps_eq, ratio, source = equal_time
        lines.append(f"- equal wall time: the baseline also trains {steps_eq} steps = round({args.steps} × r), "
                     f"r = {ratio:.2f} the MedContext / baseline step-time ratio, {source}")
    lines += [
        "",
        "Columns: Dice is the mean over datasets of the mean over each dataset's tasks (test split, oracle "
        "prompts), mean ± sample standard deviation over seeds. Δ is arm minus baseline, paired by seed "
        "and test case; its 95 % interval is a percentile bootstrap "
        f"({args.bootstrap_samples} replicates) that resamples seeds, then test cases within each dataset "
        "(`hermes.evaluation.paired`); with 3 seeds it is coarse. s / step: training seconds per step "
        "from the trainer's log, over the windows without a term-gradient measurement. The term columns "
        "are the mean over the last 20 % of the steps of the logged raw terms (seg: the clean supervised "
        "loss), the effective consistency weight (ramps and `consistency_target_fraction` included) and "
        "each term's share of the summed gradient norms (supervised / masked supervision / consistency).",
        "",
    ]
    views = [("equal steps", args.steps)] + ([("equal wall time", equal_time[0])] if equal_time else [])
    for shots in args.shots:
        lines += [f"### {shots} training cases per dataset", ""]
        mine = [r for r in rows if r["shots"] == shots]
        arm_runs = {name: {r["seed"]: r for r in mine if r["arm"] == name} for name in arms}
        for view, steps in views:
            base = {r["seed"]: r for r in mine if r["arm"] == grid.BASELINE and r["steps"] == steps}
            lines += [f"#### {view}: baseline {steps} steps, arms {args.steps} steps", "",
                      *grid.arm_table(arm_runs, base, samples=args.bootstrap_samples), ""]
        base = {r["seed"]: r for r in mine if r["arm"] == grid.BASELINE and r["steps"] == args.steps}
        per_dataset = grid.dataset_table(arm_runs, base, samples=args.bootstrap_samples)
        if per_dataset:
            lines += ["Δ per dataset (equal steps):", "", *per_dataset, ""]
    return lines


def grid_main(args: argparse.Namespace, argv: list[str], code_version: str) -> int:
    arms = grid.load_grid(args.grid)  # every arm checked before anything trains
    if args.arms:
        unknown = [name for name in args.arms if name not in arms]
        if unknown:
            raise SystemExit(f"{args.grid}: no arm named {', '.join(unknown)} (arms: {', '.join(arms)})")
        arms = {name: arms[name] for name in args.arms}
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cost, equal_time = None, None
    if args.equal_time:
        ratio, source, cost = time_ratio(args, work)
        equal_time = (round(args.steps * ratio), ratio, source)
        print(f"equal wall time: baseline {equal_time[0]} steps (r = {ratio:.2f}, {source})", flush=True)
    rows = run_grid(args, arms, equal_time[0] if equal_time else None, code_version)
    body = grid_section(rows, args, arms, equal_time)
    print("\n".join(body), flush=True)
    if args.out is not None:
        write_report(args.out, args, cost, body, argv, code_version, title="MedContext ablation grid")
    return 0


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def cost_lines(cost: dict[str, Any], args: argparse.Namespace) -> list[str]:
    base, mc = cost["median_s"]["baseline"], cost["median_s"]["medcontext"]
    rss, act = cost["peak_rss_mb"], cost["activations_mb"]
    parts = cost["parts_s"]
    return [
        f"Model `{args.architecture}` tiny ({cost['params'] / 1e6:.2f} M parameters), batch 2 × "
        f"{'×'.join(map(str, args.patch))}, {args.cost_tasks} tasks, {cost['precision']}"
        f"{' + channels_last' if cost['channels_last'] else ''}, LAMB, EMA update included; median of "
        f"{args.cost_steps} interleaved steps after {args.cost_warmup} warm-up steps.",
        "",
        "| | baseline | MedContext | ratio |",
        "|---|---|---|---|",
        f"| training step | {base:.3f} s | {mc:.3f} s | {mc / base:.2f}× |",
        f"| activations saved for backward | {act['baseline']:.0f} MB | {act['medcontext']:.0f} MB "
        f"| {act['medcontext'] / act['baseline']:.2f}× |",
        f"| peak resident memory (3 steps, fresh process) | {rss['baseline']:.0f} MB | {rss['medcontext']:.0f} MB "
        f"| {rss['medcontext'] / rss['baseline']:.2f}× |",
        "",
        f"Parts of the MedContext overhead (median): mask generation {parts['mask'] * 1e3:.1f} ms, teacher forward "
        f"{parts['teacher_forward'] * 1e3:.1f} ms, teacher EMA update {parts['teacher_update'] * 1e3:.1f} ms; "
        f"teacher weights {cost['teacher_mb']:.2f} MB.",
    ]


def fewshot_lines(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        "| training cases / dataset | baseline Dice | MedContext Dice | paired difference (MC − base) | "
        "per-seed differences | time / step (base → MC) |",
        "|---|---|---|---|---|---|",
    ]
    per_dataset: list[str] = []
    term_notes: list[str] = []
    for shots in args.shots:
        by = {v: {r["seed"]: r for r in rows if r["shots"] == shots and r["variant"] == v} for v in VARIANTS}
        seeds = sorted(set(by["baseline"]) & set(by["medcontext"]))
        if not seeds:
            continue
        base = [by["baseline"][s]["dice"] for s in seeds]
        mc = [by["medcontext"][s]["dice"] for s in seeds]
        diffs = [m - b for m, b in zip(mc, base)]
        (bm, bs), (mm, ms), (dm, ds) = mean_std(base), mean_std(mc), mean_std(diffs)
        step_b = statistics.fmean(by["baseline"][s]["step_s"] for s in seeds)
        step_m = statistics.fmean(by["medcontext"][s]["step_s"] for s in seeds)
        terms = [by["medcontext"][s]["final_terms"] for s in seeds]
        term_notes.append(
            f"{shots} cases: supervised (clean) {statistics.fmean(t['seg'] for t in terms):.3f}, masked supervised "
            f"{statistics.fmean(t['masked_supervised'] for t in terms):.3f}, consistency "
            f"{statistics.fmean(t['consistency'] for t in terms):.4f}"
        )
        lines.append(
            f"| {shots} | {bm:.3f} ± {bs:.3f} | {mm:.3f} ± {ms:.3f} | {dm:+.3f} ± {ds:.3f} | "
            f"{', '.join(f'{d:+.3f}' for d in diffs)} | {step_b:.2f} s → {step_m:.2f} s |"
        )
        datasets = sorted(by["baseline"][seeds[0]]["dice_per_dataset"])
        if not per_dataset:
            per_dataset = [
                "| shots | variant | " + " | ".join(datasets) + " |",
                "|---|---|" + "---|" * len(datasets),
            ]
        for variant in VARIANTS:
            cells = []
            for d in datasets:
                values = [by[variant][s]["dice_per_dataset"].get(d) for s in seeds]
                values = [v for v in values if v is not None]
                cells.append(f"{statistics.fmean(values):.3f}" if values else "-")
            per_dataset.append(f"| {shots} | {variant} | " + " | ".join(cells) + " |")
    return [
        *lines,
        "",
        "Mean test Dice per dataset (mean over seeds):",
        "",
        *per_dataset,
        "",
        "Size of the MedContext loss terms over the last 20 % of the MedContext runs (mean over seeds; "
        "the weights are 1): " + "; ".join(term_notes) + ".",
    ]


def fewshot_section(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    return [
        "## Few-shot test Dice on the synthetic cohort",
        "",
        f"- cohort: `hermes.synthetic` (7 datasets, CT/MR/PET), scale {args.scale}, cohort seed "
        f"{args.cohort_seed}, {args.test_cases} test cases per dataset, "
        f"{' and '.join(map(str, args.shots))} training cases per dataset",
        f"- model: `{args.architecture}` tiny, patch {'×'.join(map(str, args.patch))}, batch 2, "
        f"{args.steps} steps, precision {args.precision}, LAMB (defaults), no validation hold-out, "
        "final EMA weights scored",
        f"- MedContext: defaults of `MedContextConfig` (ratio 0.6, alpha 1, beta 1, no ramp-up, separate "
        f"teacher 0.996, fill 0) except `mask_patch` {list(args.mask_patch)} and the lesion tasks "
        f"({', '.join(LESION_SHORT_NAMES)}) in `exclude_tasks`",
        f"- seeds {', '.join(map(str, args.seeds))} (training seed: weights, batches, masks); "
        "values are mean ± sample standard deviation over seeds; the difference is paired by seed",
        "- Dice: mean over datasets of the mean over each dataset's tasks, test split, oracle prompts "
        "(`hermes.evaluation.evaluate_model`)",
        "",
        *fewshot_lines(rows, args),
        "",
    ]


def write_report(
    path: Path,
    args: argparse.Namespace,
    cost: dict[str, Any] | None,
    body: list[str],
    argv: list[str],
    code_version: str,
    title: str = "MedContext benchmark",
) -> None:
    command = ".venv/bin/python bench/medcontext.py " + " ".join(argv)
    text = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}, commit {code_version} (at the start of the run)",
        f"- machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__} "
        f"(CPU shared with other jobs, load average {os.getloadavg()[0]:.1f} at the end: absolute times "
        "are noisy, ratios less so)",
        "",
    ]
    if cost is not None:
        text += ["## Cost per training step", "", *cost_lines(cost, args), ""]
    text += body
    # A hand-written "## Notes" section (the reading of the numbers) survives re-runs.
    previous = path.read_text() if path.is_file() else ""
    notes = previous[previous.index("\n## Notes") + 1 :] if "\n## Notes" in previous else ""
    atomic_write_text(path, "\n".join(text) + ("\n" + notes if notes else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / "runs" / "bench_medcontext", help="cohorts, caches, runs"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--shots", type=int, nargs="+", default=[3, 6], help="training cases per dataset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps", type=int, default=150, help="optimiser steps per run (same for both variants)"
    )
    parser.add_argument(
        "--scale", type=float, default=0.5, help="cohort resolution scale (0.5: ~7 mm voxels)"
    )
    parser.add_argument("--cohort-seed", type=int, default=0)
    parser.add_argument("--test-cases", type=int, default=4, help="test cases per dataset")
    parser.add_argument("--architecture", default="hermes_resunet")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32])
    # 4 voxels at scale 0.5 (~6-7 mm spacing) ~ 24-29 mm: the physical size of the reference's
    # 16-voxel tokens at 1.5 mm (use 8 at scale 1).
    parser.add_argument("--mask-patch", type=int, nargs=3, default=[4, 4, 4])
    parser.add_argument("--cost-only", action="store_true", help="only measure the per-step cost")
    parser.add_argument("--cost-steps", type=int, default=6)
    parser.add_argument("--cost-warmup", type=int, default=2)
    parser.add_argument(
        "--cost-tasks", type=int, default=5, help="requested tasks per sample in the cost batch"
    )
    parser.add_argument("--memory-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--grid", type=Path, default=None,
                        help="run the ablation grid of this YAML file (bench/medcontext_grid.py)")
    parser.add_argument("--equal-time", action="store_true",
                        help="grid: also train a baseline for round(steps * r) steps (r: step-time ratio)")
    parser.add_argument("--time-ratio", type=float, default=None,
                        help="grid: the MedContext / baseline step-time ratio r (default: measured once)")
    parser.add_argument("--bootstrap-samples", type=int, default=2000, help="grid: bootstrap replicates per CI")
    parser.add_argument("--arms", nargs="+", default=None, metavar="NAME",
                        help="grid: run only these arms of the grid file, in this order (default: all)")
    args = parser.parse_args(argv)
    if args.time_ratio is not None and args.time_ratio <= 0:
        parser.error("--time-ratio must be positive")
    if args.grid is None and (args.equal_time or args.time_ratio is not None):
        parser.error("--equal-time and --time-ratio belong to --grid")
    if args.grid is None and args.arms:
        parser.error("--arms belongs to --grid")
    code_version = commit()  # at start: the modules this process imports are the ones measured
    if args.memory_worker:
        memory_worker(args)
        return 0
    if args.grid is not None:
        return grid_main(args, argv, code_version)
    cost = measure_cost(args)
    print("\n".join(cost_lines(cost, args)), flush=True)
    rows = None if args.cost_only else fewshot(args)
    if rows is not None:
        print("\n".join(fewshot_lines(rows, args)), flush=True)
    if args.out is not None:
        write_report(args.out, args, cost, fewshot_section(rows, args) if rows is not None else [], argv, code_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
