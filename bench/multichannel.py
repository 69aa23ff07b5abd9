"""A 4-channel dataset in a universal model: Dice with every channel and with each one missing.

Issue 17 item 5. On the synthetic cohort with the 4-sequence brain tumour MR (Dataset108:
FLAIR, T1, T1c, T2) next to single-channel datasets, this trains

* (a) a per-dataset model on the 4-channel dataset alone (the paradigm benchmark's traditional
  row: ResUNet, ``paradigm: traditional``) for S steps, and
* (b) one universal Hermes-R on every dataset for N x S steps (equal total compute, N datasets),

both with ``model.channel_fusion: mean`` (so both train with channel dropout, ``data.
channel_dropout``, default 0.25) and the ``hermes benchmark`` defaults (tiny preset, 32^3
patches, batch 2, lr 0.004, validation once at the end), then evaluates the 4-channel dataset's
test cases with every channel and with each channel dropped (``evaluate_model(drop_channel=)``,
the missing-channel path of ``hermes predict``). Writes OUT/multichannel.md (Dice per task and
condition) and OUT/multichannel.json (per case too).

    OMP_NUM_THREADS=1 python bench/multichannel.py --work runs/multichannel --steps 300

Resumable: a trained model is reused (an interrupted training resumes from its checkpoint), and
each evaluation is kept in WORK/evaluations/ (delete it to re-evaluate).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hermes.config import EvaluationConfig, InferenceConfig, TrainConfig, validate
from hermes.evaluation.benchmark import BenchmarkOptions, ModelRow, Run, prepare_data, run_config
from hermes.fileio import atomic_write_json, atomic_write_text, json_safe

MULTI = "BrainTumourMR"
ROWS = {
    "traditional": ModelRow("resunet_mean", "ResUNet, 4-channel dataset alone", "traditional",
                            {"architecture": "resunet", "channel_fusion": "mean"}),
    "universal": ModelRow("hermes_r_mean", "Hermes-R universal, all datasets", "universal",
                          {"architecture": "hermes_resunet", "channel_fusion": "mean"}),
}


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def train_run(run: Run, work: Path, catalog: Path, cache: Path) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse / resume) one run; returns its model folder and training facts."""
    from hermes.bundle import ModelBundle, TrainingRecord, is_model_folder
    from hermes.training.checkpoint import checkpoint_path
    from hermes.training.trainer import train

    folder = run.folder(work)
    config = validate(TrainConfig, run_config(run, {}, catalog, cache, folder / "train", 0), run.name())
    model_dir = Path(config.output) / "model"
    timing_file = folder / "train_timing.json"
    if not is_model_folder(model_dir) or not timing_file.is_file():
        resume = checkpoint_path(config.output).is_file()
        log(f"{run.name()}: training {run.steps} steps" + (" (resumed)" if resume else ""))
        start = time.perf_counter()
        trained = train(config, resume=resume, progress=False)
        atomic_write_json(timing_file, {"train_wall_s": time.perf_counter() - start, "steps": trained.steps,
                                        "resumed": resume})
    timing = json.loads(timing_file.read_text())
    training = ModelBundle.load(model_dir).training or TrainingRecord()
    facts = {**timing, "final_weights": training.final_weights,
             "validation_dice_by_weights": training.validation_dice_by_weights or {},
             "channel_dropout": config.data.channel_dropout, "config": config.model_dump(mode="json")}
    return model_dir, facts


def evaluate(model_dir: Path, catalog: Path, drop: int | None, out: Path, overlap: float) -> dict[str, Any]:
    """One condition (every channel, or channel ``drop`` missing) on the multi-channel dataset's
    test cases; kept in ``out`` (reused when present)."""
    from hermes.evaluation.evaluate import evaluate_model
    from hermes.inference.channels import MissingChannelWarning

    if out.is_file():
        return json.loads(out.read_text())
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingChannelWarning)  # the drop is the point here
        result = evaluate_model(
            model_dir, catalog, split="test", datasets=[MULTI], device="cpu", progress=False,
            inference=InferenceConfig(overlap=overlap), config=EvaluationConfig(bootstrap_samples=0, workers=1),
            drop_channel=drop,
        )
    entry = result.summary["datasets"][MULTI]
    record = {
        "dropped": (result.summary.get("dropped_channel") or {}).get("datasets", {}).get(MULTI),
        "n_cases": entry["n_cases"],
        "mean_dice": entry["mean"]["dice"]["mean"],
        "tasks": {task.split("/")[-1]: stats["dice"]["mean"] for task, stats in entry["tasks"].items()},
        "cases": [{k: r[k] for k in ("case", "task", "dice")} for r in result.rows],
        "eval_wall_s": time.perf_counter() - start,
    }
    atomic_write_json(out, json_safe(record))
    return record


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    conditions = meta["conditions"]
    header = "| model | task | " + " | ".join(conditions) + " |"
    lines = [f"# {meta['title']}", "", meta["setup"], "", header, "|" + "---|" * (len(conditions) + 2)]
    for row in results.values():
        tasks = list(row["evaluations"][conditions[0]]["tasks"])
        for task in [*tasks, "mean"]:
            cells = []
            for condition in conditions:
                evaluation = row["evaluations"][condition]
                value = evaluation["mean_dice"] if task == "mean" else evaluation["tasks"][task]
                cells.append("-" if value is None else f"{value:.3f}")
            name = f"{row['label']} ({row['steps']} steps)" if task == tasks[0] else ""
            lines.append(f"| {name} | {'**mean**' if task == 'mean' else task} | " + " | ".join(cells) + " |")
    lines += ["", f"Test cases of {MULTI}: {meta['n_test_cases']}; Dice on each case's native grid (mean over the "
              "cases; the mean row is the mean over the two tasks).", "", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="cohort, cache, runs and outputs")
    parser.add_argument("--out", type=Path, default=None, help="multichannel.md/json here (default: WORK)")
    parser.add_argument("--steps", type=int, required=True, help="S: steps of the per-dataset model")
    parser.add_argument("--datasets", nargs="+", default=["108", "BrainT1", "LiverCT", "AbdomenCT"],
                        help="synthetic datasets (must include 108 BrainTumourMR)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--data-seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--cases", type=int, default=None, help="training cases per dataset (default: each one's)")
    parser.add_argument("--test-cases", type=int, default=4, help="test cases per dataset")
    parser.add_argument("--scale", type=float, default=1.0, help="cohort voxels per axis x scale")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap at evaluation")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from hermes.data.catalog import load_catalog

    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    options = BenchmarkOptions(work=work, synthetic=True, synthetic_datasets=list(args.datasets), cases=args.cases,
                               test_cases=args.test_cases, data_seed=args.data_seed, scale=args.scale)
    catalog_path, cache = prepare_data(options, work)
    catalog = load_catalog(catalog_path)
    if MULTI not in [e.name for e in catalog.datasets]:
        parser.error(f"--datasets must include 108 ({MULTI})")
    entry = catalog.dataset(MULTI)
    n = len([e for e in catalog.datasets if not e.test_only and e.num_train > 0])
    runs = [Run(ROWS["traditional"], MULTI, args.seed, args.steps, (MULTI,)),
            Run(ROWS["universal"], None, args.seed, args.steps * n, (MULTI,))]
    drops: list[int | None] = [None, *range(entry.num_channels)]
    conditions = ["all channels", *(f"minus {m}" for m in entry.channel_modalities)]

    results: dict[str, Any] = {}
    for run in runs:
        model_dir, facts = train_run(run, work, catalog_path, cache)
        evaluations = {}
        for drop, condition in zip(drops, conditions):
            tag = "all" if drop is None else f"without{drop}"
            record = evaluate(model_dir, catalog_path, drop, work / "evaluations" / f"{run.row.key}_{tag}.json",
                              args.overlap)
            evaluations[condition] = record
            log(f"{run.row.label}: {condition}: Dice " + ", ".join(f"{t} {v:.3f}" for t, v in record["tasks"].items())
                + f" (mean {record['mean_dice']:.3f}; {record['eval_wall_s']:.0f} s)")
        results[run.row.key] = {"label": run.row.label, "paradigm": run.row.paradigm, "steps": run.steps,
                                "model_dir": str(model_dir), "training": facts, "evaluations": evaluations}

    n_test = results[runs[0].row.key]["evaluations"][conditions[0]]["n_cases"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    meta = {
        "title": f"{MULTI} (4 channels) per-dataset vs universal, each channel dropped at test time",
        "setup": (f"Synthetic cohort {', '.join(e.name for e in catalog.datasets)} (data seed {args.data_seed}, "
                  f"scale {args.scale}, {args.test_cases} test cases per dataset); training seed {args.seed}; "
                  f"S = {args.steps} steps for the per-dataset model, N x S = {n} x {args.steps} = {n * args.steps} "
                  "for the universal one (equal total compute); tiny preset, 32^3 patches, batch 2, "
                  "channel_fusion mean, channel dropout "
                  f"{results[runs[0].row.key]['training']['channel_dropout']}; sliding-window overlap {args.overlap}."),
        "conditions": conditions,
        "n_test_cases": n_test,
        "datasets": [e.name for e in catalog.datasets],
        "steps": args.steps,
        "universal_steps": n * args.steps,
        "seed": args.seed,
        "data_seed": args.data_seed,
        "commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python bench/multichannel.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    out = (args.out or work).resolve()
    atomic_write_json(out / "multichannel.json", json_safe({"meta": meta, "results": results}))
    md = markdown(results, meta)
    atomic_write_text(out / "multichannel.md", md)
    print(md, flush=True)
    deltas = {key: {c: float(np.round(row["evaluations"][c]["mean_dice"] - row["evaluations"][conditions[0]]["mean_dice"], 4))
                    for c in conditions[1:]} for key, row in results.items()}
    log(f"mean Dice change with a channel missing: {deltas}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
