"""``hermes demo``: the whole pipeline on the built-in synthetic cohort, on a CPU, in minutes.

    cohort (7 partially-labelled datasets: CT, MR T1/T2, PET)  -> OUT/cohort/
    catalog (one task per dataset label)                       -> OUT/catalog.yaml
    prepare                                                    -> OUT/cache/
    train one universal Hermes-R (preset cpu-demo)             -> OUT/run/ (model in OUT/run/model)
    evaluate on every dataset's test split (native grid)       -> OUT/evaluation/ (report.html with
                                                                  reference-vs-prediction overlays
                                                                  of the best and worst case per
                                                                  dataset, also as overlays/*.png)

Every stage resumes: re-running the command reuses the cohort and the cache, continues an
interrupted training from its checkpoint, and only re-evaluates. ``OUT/train.yaml`` is the
training config used, so ``hermes train OUT/train.yaml --resume --extend-steps N`` trains on.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hermes.cli.args import NON_NEGATIVE_INT, POSITIVE_INT
from hermes.fileio import atomic_write_text


@dataclass
class DemoResult:
    out: Path
    model_dir: Path
    summary: dict[str, Any]
    table: str
    seconds: dict[str, float] = field(default_factory=dict)
    overlays: list[Path] = field(default_factory=list)  # overlay PNGs of the report, report order

    @property
    def report(self) -> Path:
        return self.out / "evaluation" / "report.html"

    @property
    def mean_dice(self) -> float:
        return float(self.summary["overall"]["mean_over_tasks"]["dice"])


def write_catalog(folders: Sequence[Path], out: Path) -> Path:
    """A default catalog of the cohort (one task per dataset label, paths relative to ``out``)."""
    from hermes.data.catalog import default_catalog_spec

    path = out / "catalog.yaml"
    atomic_write_text(path, yaml.safe_dump(default_catalog_spec(list(folders), relative_to=out), sort_keys=False))
    return path


def write_train_config(out: Path, overrides: dict[str, Any] | None = None) -> Path:
    """OUT/train.yaml: the cpu-demo preset on this demo's catalog and cache."""
    data: dict[str, Any] = {"preset": "cpu-demo", "catalog": "catalog.yaml", "cache": "cache", "output": "run"}
    data.update(overrides or {})
    path = out / "train.yaml"
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    scale: float = 1.0,
    cases: int | None = None,
    test_cases: int | None = None,
    datasets: Sequence[str] | None = None,
    train_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run (or resume) the demo pipeline under ``out``; returns the test-set evaluation."""
    from hermes.cli.cohort import describe_cohort
    from hermes.config import load_train_config
    from hermes.data.cache import prepare_cache
    from hermes.data.catalog import load_catalog
    from hermes.evaluation.evaluate import evaluate_model, format_table, write_outputs
    from hermes.evaluation.report import overlay_files
    from hermes.synthetic import generate_cohort
    from hermes.synthetic.datasets import select_datasets
    from hermes.training.checkpoint import checkpoint_path
    from hermes.training.trainer import train

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(name: str) -> None:
        seconds[name] = time.perf_counter()
        print(f"[demo] {name} ...", flush=True)

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - seconds[name]
        print(f"[demo] {name}: {seconds[name]:.0f} s", flush=True)

    stage("cohort")
    folders = generate_cohort(
        out / "cohort", seed=seed, scale=scale, datasets=datasets, cases=cases, test_cases=test_cases, progress=progress
    )
    catalog_path = write_catalog(folders, out)
    done("cohort")
    print(describe_cohort(folders), flush=True)  # what was generated

    stage("prepare")
    prepare_cache(load_catalog(catalog_path), out / "cache", progress=progress)
    done("prepare")

    stage("train")
    overrides: dict[str, Any] = {"seed": seed, **(train_overrides or {})}
    if any(len(spec.sequences) > 1 for spec in select_datasets(list(datasets) if datasets else None)):
        # a multi-channel dataset next to single-channel ones (e.g. 108 BrainTumourMR): the
        # per-channel stem (docs/architecture.md, "Input channels"), unless the caller chose
        overrides["model"] = {"channel_fusion": "mean", **overrides.get("model", {})}
    config = load_train_config(write_train_config(out, overrides))
    resume = checkpoint_path(config.output).is_file()
    result = train(config, resume=resume, progress=progress)
    done("train")

    stage("evaluate")
    # overlays: the same reference-vs-prediction figures as `hermes evaluate --report` (the
    # best, median and worst case of each dataset)
    evaluation = evaluate_model(result.model_dir, catalog_path, split="test", overlays=True, progress=progress)
    report = write_outputs(evaluation, out / "evaluation", report=True,
                           title="Hermes demo: synthetic cohort (test split)") / "report.html"
    done("evaluate")
    overlays = overlay_files(report)
    print(f"[demo] report: {report}", flush=True)
    if overlays:
        print(f"[demo] segmentation overlay (image | reference | prediction): {overlays[0]}", flush=True)
    return DemoResult(out, result.model_dir, evaluation.summary, format_table(evaluation.summary), seconds, overlays)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help=f"cohort and training seed, {NON_NEGATIVE_INT}")
    parser.add_argument(
        "--steps", type=POSITIVE_INT, help=f"training steps, {POSITIVE_INT} (default: the cpu-demo preset's)"
    )
    parser.add_argument(
        "--datasets", nargs="+", metavar="NAME",
        help="synthetic datasets by folder name, short name or number (default: the default cohort); naming "
        "the 4-channel 108 BrainTumourMR trains with model.channel_fusion: mean",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    overrides = {"steps": args.steps} if args.steps else None
    start = time.perf_counter()
    result = run_demo(args.out, seed=args.seed, datasets=args.datasets, train_overrides=overrides,
                      progress=not args.quiet)
    total = time.perf_counter() - start
    print()
    print("Test-set Dice per dataset and task (native image grid, oracle prompts):")
    print(result.table)
    print()
    timing = ", ".join(f"{name} {sec / 60:.1f} min" for name, sec in result.seconds.items())
    print(f"mean Dice over all tasks: {result.mean_dice:.3f}   ({timing}; total {total / 60:.1f} min)")
    print(f"model: {result.model_dir}   report: {result.report}")
    if result.overlays:
        print(f"segmentation overlay (reference | prediction, first dataset's best case): {result.overlays[0]}")
    print(f"segment a new image: hermes predict -m {result.model_dir} -i IMAGE.nii.gz -o OUT.nii.gz")
    return 0
