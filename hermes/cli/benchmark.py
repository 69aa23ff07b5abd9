"""``hermes benchmark``: universal vs per-dataset models, trained and scored on the same cases.

The logic is in :mod:`hermes.evaluation.benchmark`; this module only maps arguments to
:class:`~hermes.evaluation.benchmark.BenchmarkOptions`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hermes.cli.args import FRACTION, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT
from hermes.errors import ConfigError


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"expected A:B (two model keys), got {text!r}")
    return a, b


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hermes.evaluation.benchmark import BUDGET_RULES, MODELS, PAPER_LIKE

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "models: " + ", ".join(f"{k} ({r.paradigm})" for k, r in MODELS.items()) + "\n\n"
        "example (synthetic cohort, 10 test cases per dataset, equal total compute):\n"
        "  hermes benchmark --synthetic --work runs/bench/syn --synthetic-datasets AbdomenCT LiverCT \\\n"
        "      --test-cases 10 --models resunet hermes_r shared_resunet --seeds 0 1 2 --steps 1200"
    )
    data = parser.add_argument_group("data")
    data.add_argument("--catalog", type=Path, help="catalog YAML (with --cache)")
    data.add_argument("--cache", type=Path, help="prepared cache of --catalog (prepared here if missing)")
    data.add_argument("--synthetic", action="store_true", help="generate + prepare the built-in cohort in WORK")
    data.add_argument("--synthetic-datasets", nargs="+", default=list(PAPER_LIKE), metavar="NAME",
                      help=f"synthetic datasets (default: {' '.join(PAPER_LIKE)})")
    data.add_argument("--cases", type=POSITIVE_INT, help=f"synthetic: training cases per dataset, {POSITIVE_INT} (default: each dataset's own)")
    data.add_argument("--test-cases", type=POSITIVE_INT, help=f"synthetic: test cases per dataset, {POSITIVE_INT} (default: each dataset's own)")
    data.add_argument("--data-seed", type=NON_NEGATIVE_INT, default=0, help=f"synthetic: cohort seed, {NON_NEGATIVE_INT} (default 0)")
    data.add_argument("--scale", type=POSITIVE_FLOAT, default=1.0, help=f"synthetic: voxels per axis relative to default, {POSITIVE_FLOAT}")
    data.add_argument("--data-name", help="name of the data in summary.json, e.g. realmini (default: synthetic, or the catalog's folder name)")

    runs = parser.add_argument_group("runs")
    runs.add_argument("--work", type=Path, required=True, help="folder of the runs (and of the synthetic cohort)")
    runs.add_argument("--out", type=Path, help="where paradigm.md/.json and summary.json go (default: WORK)")
    runs.add_argument("--models", nargs="+", default=["resunet", "hermes_r"], metavar="KEY",
                      help="rows, in order (default: resunet hermes_r)")
    runs.add_argument("--seeds", type=NON_NEGATIVE_INT, nargs="+", default=[0], help=f"training seeds, {NON_NEGATIVE_INT} (default 0)")
    runs.add_argument("--steps", type=POSITIVE_INT, default=200,
                      help=f"S: optimiser steps of each per-dataset model, {POSITIVE_INT} (default 200)")
    runs.add_argument("--budget-rule", default="equal_total_compute", choices=BUDGET_RULES,
                      help="equal_total_compute: universal models train N x S steps (N training datasets); "
                      "equal_steps: every model S steps (default equal_total_compute)")
    runs.add_argument("--recipe", type=Path, help="YAML of TrainConfig overrides given to every run (e.g. loss: {reduction: pair})")
    runs.add_argument("--preset", help="a hermes/configs preset under the recipe (e.g. cpu-demo)")
    runs.add_argument("--preset-size", choices=["tiny", "small", "base"], help="model.preset (default tiny)")
    runs.add_argument("--patch", type=POSITIVE_INT, help=f"cubic patch size, {POSITIVE_INT} (default 32)")
    runs.add_argument("--batch", type=POSITIVE_INT, help=f"batch size, {POSITIVE_INT} (default 2)")
    runs.add_argument("--lr", type=POSITIVE_FLOAT, help=f"learning rate, {POSITIVE_FLOAT} (default 0.004)")
    runs.add_argument("--val-fraction", type=FRACTION,
                      help=f"validation hold-out per dataset, {FRACTION} (default: the config's, the same for both paradigms)")
    runs.add_argument("--loader-workers", type=NON_NEGATIVE_INT, default=0,
                      help=f"DataLoader workers, {NON_NEGATIVE_INT} (default 0: main process)")
    runs.add_argument("--prepare-workers", type=POSITIVE_INT, default=1, help=f"processes preparing the cache, {POSITIVE_INT} (default 1)")
    runs.add_argument("--threads", type=POSITIVE_INT, default=1, help=f"torch threads, {POSITIVE_INT} (default 1: one core per benchmark)")
    runs.add_argument("--device", help="evaluation device (default: the predictor's choice)")
    runs.add_argument("--deadline", help="HH:MM local time (its next occurrence, within 24 h): start no new run after it; the tables are still written")
    runs.add_argument("--report-only", action="store_true",
                      help="train nothing: write the tables from the runs already finished under WORK")
    runs.add_argument("--progress", action="store_true", help="a progress bar within each training run")

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--max-test-cases", type=POSITIVE_INT, help=f"at most this many test cases per dataset, {POSITIVE_INT}")
    scoring.add_argument("--overlap", type=FRACTION, default=0.5, help=f"sliding-window overlap, {FRACTION} (default 0.5)")
    scoring.add_argument("--compare", nargs="+", type=_pair, metavar="A:B",
                         help="paired differences to report (default: hermes_r:resunet shared_resunet:resunet "
                         "hermes_r:shared_resunet)")
    scoring.add_argument("--bootstrap-samples", type=POSITIVE_INT, default=10000, help=f"bootstrap replicates, {POSITIVE_INT} (default 10000)")
    scoring.add_argument("--bootstrap-seed", type=NON_NEGATIVE_INT, default=0, help=f"bootstrap seed, {NON_NEGATIVE_INT}")
    scoring.add_argument("--title", help="table title")
    scoring.add_argument("--summary-into", type=Path,
                         help="merge this run's comparisons into this JSON file (e.g. docs/bench/paradigm_summary.json)")


def run(args: argparse.Namespace) -> int:
    from hermes.evaluation.benchmark import BenchmarkOptions, command_line, run_benchmark

    if args.scale <= 0:
        raise ConfigError(f"--scale must be positive, got {args.scale}")
    options = BenchmarkOptions(
        work=args.work, catalog=args.catalog, cache=args.cache, synthetic=args.synthetic,
        synthetic_datasets=args.synthetic_datasets, cases=args.cases, test_cases=args.test_cases,
        data_seed=args.data_seed, scale=args.scale, out=args.out, data_name=args.data_name, title=args.title,
        models=args.models, seeds=args.seeds, steps=args.steps, budget_rule=args.budget_rule, recipe=args.recipe,
        preset=args.preset, preset_size=args.preset_size, patch=args.patch, batch=args.batch, lr=args.lr,
        val_fraction=args.val_fraction, max_test_cases=args.max_test_cases, overlap=args.overlap,
        threads=args.threads, loader_workers=args.loader_workers, prepare_workers=args.prepare_workers,
        device=args.device, compare=args.compare, bootstrap_samples=args.bootstrap_samples,
        bootstrap_seed=args.bootstrap_seed, summary_into=args.summary_into, deadline=args.deadline,
        report_only=args.report_only, progress=args.progress, command=command_line(),
    )  # fmt: skip
    return run_benchmark(options)
