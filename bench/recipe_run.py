"""One screening run of a training recipe: `hermes train` with a config, then every test case
scored by `hermes.evaluation.evaluate_model`; writes OUT/result.json (per dataset, per task,
per case) and prints one line. The single-seed rows of docs/benchmarks.md section 1b.

    OMP_NUM_THREADS=1 .venv/bin/python bench/recipe_run.py runs/screen/hnhippo --catalog CATALOG \\
        --cache CACHE --steps 1200 --preset cpu-demo --set '{"validation": {"every_steps": 1000000000}}'

``--set`` (repeatable) is a JSON object deep-merged into the config, e.g. the paper's recipe:
``--preset paper-recipe`` or ``--set '{"loss": {"reduction": "pair"}}'``. Validation runs once, at
the end (it chooses raw or EMA weights; the test split chooses nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hermes.bundle import ModelBundle, TrainingRecord
from hermes.config import EvaluationConfig, TrainConfig, deep_merge, load_preset, validate
from hermes.evaluation.evaluate import evaluate_model
from hermes.fileio import atomic_write_json
from hermes.training.trainer import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="run folder (train/ and result.json)")
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=None, help="a hermes/configs preset under --set")
    parser.add_argument("--set", action="append", default=[], help="JSON config overrides (repeatable)")
    parser.add_argument("--dataset", default=None, help="train one traditional model on this dataset")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result_path = args.out / "result.json"
    if result_path.exists():
        print(f"{result_path} exists; nothing to do")
        return 0
    config = load_preset(args.preset) if args.preset else {}
    config = deep_merge(config, {
        "catalog": args.catalog, "cache": args.cache, "output": str(args.out / "train"), "steps": args.steps,
        "seed": args.seed, "checkpoint_every": 10**6, "log_every": 50, "data": {"num_workers": 0},
    })
    for item in args.set:
        config = deep_merge(config, json.loads(item))
    if args.dataset:
        config.update(paradigm="traditional", dataset=args.dataset)
    start = time.perf_counter()
    result = train(validate(TrainConfig, config, str(args.out)), progress=False)
    train_s = time.perf_counter() - start
    evaluation = evaluate_model(
        result.model_dir, args.catalog, split="test", datasets=[args.dataset] if args.dataset else None,
        device="cpu", progress=False, config=EvaluationConfig(bootstrap_samples=0, workers=1),
    )
    training = ModelBundle.load(result.model_dir).training or TrainingRecord()
    datasets = {
        name: {"dice": entry["mean"]["dice"]["mean"], "n": entry["n_cases"],
               "tasks": {task: stats["dice"]["mean"] for task, stats in entry["tasks"].items()}}
        for name, entry in evaluation.summary["datasets"].items()
    }
    atomic_write_json(result_path, {
        "steps": args.steps, "seed": args.seed, "preset": args.preset, "set": args.set, "train_s": train_s,
        "final_weights": training.final_weights,
        "validation": training.validation_dice_by_weights,
        "datasets": datasets,
        "rows": [{k: row.get(k) for k in ("dataset", "case", "task", "dice")} for row in evaluation.rows],
    })
    mean = sum(d["dice"] for d in datasets.values()) / len(datasets)
    print(f"{args.out}: train {train_s:.0f} s, weights {training.final_weights}, "
          + ", ".join(f"{n} {d['dice']:.3f}" for n, d in datasets.items()) + f", mean {mean:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
