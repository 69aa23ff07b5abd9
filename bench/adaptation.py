"""Transfer and incremental learning on the synthetic cohort (docs/bench/adaptation.md).

Held out: one dataset (default LiverCT: liver + liver tumour, CT). Upstream: every other
dataset of the cohort.

Transfer, with 3 and 10 training cases of the held-out dataset, same fine-tuning recipe
(`hermes finetune` engine, same steps, lr, patch) for every arm:

  (a) scratch     a Hermes-R model with random weights
  (b) traditional a per-dataset ResUNet pre-trained on one upstream dataset (AbdomenCT);
                  its output layer is re-initialised for the new tasks
  (c) universal   the Hermes-R model pre-trained on all upstream datasets

Incremental learning (10 cases): `hermes extend` (rehearsal + distillation) vs plain
`hermes finetune` from the universal model: old-task Dice before/after, new-task Dice.

Every stage is resumable (skipped when its output exists), so the script can be re-run after
an interruption. Keep budgets small: the CPU is shared.

    .venv/bin/python bench/adaptation.py --work runs/bench_adaptation --doc docs/bench/adaptation.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from hermes.bundle import is_model_folder
from hermes.fileio import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
def make_data(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    from hermes.data.cache import prepare_cache
    from hermes.data.catalog import load_catalog
    from hermes.synthetic import generate_cohort, list_synthetic_datasets

    cohort = work / "cohort"
    if not (cohort / ".done").exists():
        log("generating the synthetic cohort")
        generate_cohort(cohort, seed=args.seed, scale=args.scale, progress=False)
        (cohort / ".done").write_text("ok\n")
    names = [d.name for d in list_synthetic_datasets()]
    held = [n for n in names if any(n.endswith("_" + h) for h in args.held_out)]
    upstream = [n for n in names if n not in held]
    paths = {"upstream": work / "upstream.yaml", "heldout": work / "heldout.yaml"}
    paths["upstream"].write_text(yaml.safe_dump({"datasets": [{"path": str(cohort / n)} for n in upstream]}))
    paths["heldout"].write_text(yaml.safe_dump({"datasets": [{"path": str(cohort / n)} for n in held]}))
    for key in ("upstream", "heldout"):
        cache = work / f"cache_{key}"
        if not (cache / ".done").exists():
            log(f"preparing {key} cache")
            prepare_cache(load_catalog(paths[key]), cache, workers=args.workers, progress=False)
            (cache / ".done").write_text("ok\n")
        paths[f"cache_{key}"] = cache
    paths["cohort"] = cohort
    return paths


def pretrain(work: Path, paths: dict[str, Path], args: argparse.Namespace, name: str, extra: dict[str, Any]) -> Path:
    from hermes.config import load_train_config
    from hermes.training.trainer import train

    out = work / f"pretrain_{name}"
    model_dir = out / "model"
    if is_model_folder(model_dir):
        return model_dir
    if out.exists():
        shutil.rmtree(out)
    config = {
        "catalog": str(paths["upstream"]), "cache": str(paths["cache_upstream"]), "output": str(out),
        "steps": args.pretrain_steps, "seed": args.seed, "checkpoint_every": 10**6, "log_every": 50,
        "model": {"preset": "tiny"},
        "data": {"patch_size": args.patch, "batch_size": 2, "num_workers": 1},
        "optim": {"lr": args.pretrain_lr, "warmup_steps": 50},
        "validation": {"every_steps": 10**6},
        **extra,
    }
    config_path = work / f"pretrain_{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log(f"pre-training {name} ({args.pretrain_steps} steps)")
    start = time.perf_counter()
    train(load_train_config(config_path), progress=False)
    log(f"pre-training {name} done in {time.perf_counter() - start:.0f} s")
    return model_dir


def scratch_base(work: Path, universal: Path, seed: int) -> Path:
    """The universal model's directory with freshly initialised weights (arm (a))."""
    from hermes.bundle import ModelBundle, TrainingRecord, catalog_path
    from hermes.models.registry import build_saved_network, save_model

    out = work / "scratch_base"
    if is_model_folder(out):
        return out
    bundle = ModelBundle.load(universal)
    torch.manual_seed(seed)
    model = build_saved_network(bundle)
    out.mkdir(parents=True, exist_ok=True)
    note = "random initialisation (scratch arm of bench/adaptation.py)"
    bundle = bundle.model_copy(update={"training": TrainingRecord(steps=0, note=note)})
    save_model(out, model, bundle, catalog_yaml=catalog_path(universal).read_text())
    return out


def heldout_scores(model_dir: Path, datasets: list[str], max_cases: int | None) -> dict[str, Any]:
    from hermes.adaptation.extend import task_dice
    from hermes.config import EvaluationConfig
    from hermes.evaluation.evaluate import evaluate_model

    result = evaluate_model(model_dir, datasets=datasets, device="cpu", progress=False, max_cases=max_cases,
                            config=EvaluationConfig(bootstrap_samples=0, workers=1))
    return {task: value for task, (value, _) in task_dice(result.summary).items()}


def finetune_arm(work: Path, paths: dict[str, Path], args: argparse.Namespace, base: Path, name: str,
                 cases: int, freeze: str = "none") -> dict[str, Any]:
    from hermes.adaptation.finetune import run_finetune
    from hermes.config import FinetuneConfig

    out = work / f"ft_{name}_{cases}"
    result_path = out.with_suffix(".json")
    if result_path.exists():
        return json.loads(result_path.read_text())
    config = FinetuneConfig(
        base_model=base, catalog=paths["heldout"], cache=paths["cache_heldout"], output=out,
        steps=args.finetune_steps, seed=args.seed, max_train_cases=cases, freeze=freeze,  # type: ignore[arg-type]
        data={"patch_size": args.patch, "batch_size": 2, "num_workers": 1},
        optim={"lr": args.finetune_lr, "warmup_steps": 20},
    )
    log(f"fine-tuning {name} on {cases} cases")
    start = time.perf_counter()
    run_finetune(config, device="cpu", overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    scores = heldout_scores(out, heldout_names(paths), None)
    row = {"arm": name, "cases": cases, "freeze": freeze, "seconds": round(seconds, 1), "dice": scores}
    atomic_write_json(result_path, row)
    log(f"  {name} {cases}: {scores}")
    return row


def heldout_names(paths: dict[str, Path]) -> list[str]:
    from hermes.data.catalog import load_catalog

    return [entry.name for entry in load_catalog(paths["heldout"]).datasets]


def upstream_names(paths: dict[str, Path]) -> list[str]:
    from hermes.data.catalog import load_catalog

    return [entry.name for entry in load_catalog(paths["upstream"]).datasets]


def incremental(work: Path, paths: dict[str, Path], args: argparse.Namespace, universal: Path,
                plain_dir: Path) -> dict[str, Any]:
    from hermes.adaptation.extend import make_evaluator, run_extend
    from hermes.config import ExtendConfig

    result_path = work / "incremental.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    out = work / f"extend_universal_{max(args.cases)}"
    config = ExtendConfig(
        base_model=universal, catalog=paths["heldout"], cache=paths["cache_heldout"], output=out,
        old_cache=paths["cache_upstream"], steps=args.finetune_steps, seed=args.seed, max_train_cases=max(args.cases),
        rehearsal_cases=args.rehearsal_cases, rehearsal_batch=1, distill_weight=args.distill_weight,
        gate_max_cases=args.gate_cases, forgetting_tolerance=args.tolerance,
        data={"patch_size": args.patch, "batch_size": 2, "num_workers": 1},
        optim={"lr": args.finetune_lr, "warmup_steps": 20},
    )
    log(f"extend (rehearsal + distillation) on {max(args.cases)} cases")
    start = time.perf_counter()
    outcome = run_extend(config, device="cpu", evaluator=make_evaluator("cpu", progress=False), progress=False)
    seconds = time.perf_counter() - start
    gate = outcome.gate.to_dict() if outcome.gate else {}
    log("plain finetune: old tasks after")
    plain_after = heldout_scores(plain_dir, upstream_names(paths), args.gate_cases)
    result = {
        "extend": {"accepted": outcome.accepted, "written_to": str(outcome.written_to), "seconds": round(seconds, 1),
                   **gate},
        "plain_finetune_old_after": plain_after,
    }
    atomic_write_json(result_path, result)
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Transfer and incremental learning on the synthetic cohort",
        "",
        f"Measured {meta['date']} at commit `{meta['commit']}` on {meta['machine']} "
        f"({meta['threads']} torch threads, CPU shared with other jobs), by:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Cohort: `hermes cohort` seed {meta['seed']}, scale {meta['scale']}. Held out: "
        f"{', '.join(meta['held_out'])}; upstream: every other dataset. Model: Hermes-R `tiny`, patch "
        f"{meta['patch']}. Pre-training: {meta['pretrain_steps']} steps (batch 2, lr {meta['pretrain_lr']}); "
        f"every fine-tuning run: {meta['finetune_steps']} steps, batch 2, lr {meta['finetune_lr']}, "
        "LAMB, EMA 0.99, the same recipe for all arms. Dice: `hermes evaluate` on the held-out test "
        "split (native grid), mean over test cases, in points (0-100).",
        "",
        "These budgets are tiny (CPU, minutes): the numbers compare the arms under one small budget; "
        "they are not converged accuracies.",
        "",
        "## Transfer to the held-out dataset",
        "",
    ]
    rows = results["transfer"]
    tasks = sorted({t for row in rows for t in row["dice"]})
    lines.append("| arm | train cases | " + " | ".join(tasks) + " | mean | time (s) |")
    lines.append("|---|---|" + "---|" * len(tasks) + "---|---|")
    for row in rows:
        values = [row["dice"].get(t) for t in tasks]
        real = [v for v in values if v is not None]
        mean = sum(real) / len(real) if real else None
        label = {"scratch": "(a) scratch", "traditional": "(b) traditional (ResUNet, AbdomenCT)",
                 "universal": "(c) universal Hermes"}.get(row["arm"], row["arm"])
        if row.get("freeze") == "backbone":
            label += ", frozen backbone"
        lines.append(f"| {label} | {row['cases']} | " + " | ".join(_f(v) for v in values)
                     + f" | {_f(mean)} | {row['seconds']:.0f} |")
    inc = results.get("incremental")
    if inc:
        ext = inc["extend"]
        lines += [
            "",
            f"## Incremental learning ({max(meta['cases'])} cases of the held-out dataset)",
            "",
            f"`hermes extend` with rehearsal ({meta['rehearsal_cases']} cases per old dataset, 1 old sample per "
            f"batch) and distillation (weight {meta['distill_weight']}, MSE on probabilities) vs plain "
            f"`hermes finetune` (no protection), same steps. Old tasks scored on at most {meta['gate_cases']} "
            "test cases per old dataset.",
            "",
            "| old task | before | extend | plain finetune |",
            "|---|---|---|---|",
        ]
        plain = inc["plain_finetune_old_after"]
        for row in ext.get("old_tasks", []):
            lines.append(f"| {row['task']} | {_f(row['before'])} | {_f(row['after'])} | {_f(plain.get(row['task']))} |")
        before = [r["before"] for r in ext.get("old_tasks", []) if r["before"] is not None]
        after = [r["after"] for r in ext.get("old_tasks", []) if r["after"] is not None]
        plain_values = [plain[r["task"]] for r in ext.get("old_tasks", []) if plain.get(r["task"]) is not None]

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        lines.append(f"| **mean** | {_f(mean(before))} | {_f(mean(after))} | {_f(mean(plain_values))} |")
        new_plain = next((r["dice"] for r in rows if r["arm"] == "universal" and r["cases"] == max(meta["cases"])
                          and r.get("freeze", "none") == "none"), {})
        lines += ["", "| new task | extend | plain finetune |", "|---|---|---|"]
        for task, value in ext.get("new_tasks", {}).items():
            lines.append(f"| {task} | {_f(value)} | {_f(new_plain.get(task))} |")
        lines += [
            "",
            f"Forgetting gate (tolerance {ext.get('tolerance_dice_points')} points): "
            f"{'passed' if ext.get('passed') else 'FAILED: ' + ', '.join(ext.get('violations', []))}; "
            f"extend took {ext['seconds']:.0f} s including the before/after evaluations.",
        ]
    lines += ["", "## Observations", "", results.get("observations", "(see docs/adaptation.md)"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_adaptation"))
    parser.add_argument("--doc", type=Path, help="write the markdown report here")
    parser.add_argument("--held-out", nargs="+", default=["LiverCT"])
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--pretrain-lr", type=float, default=4e-3)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--finetune-lr", type=float, default=2e-3)
    parser.add_argument("--cases", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rehearsal-cases", type=int, default=4)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--gate-cases", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-incremental", action="store_true")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = make_data(work, args)
    universal = pretrain(work, paths, args, "universal", {})
    traditional = pretrain(work, paths, args, "traditional", {
        "paradigm": "traditional", "dataset": "AbdomenCT", "model": {"architecture": "resunet", "preset": "tiny"},
    })
    scratch = scratch_base(work, universal, args.seed)
    transfer = []
    for cases in args.cases:
        for name, base in (("scratch", scratch), ("traditional", traditional), ("universal", universal)):
            transfer.append(finetune_arm(work, paths, args, base, name, cases))
    transfer.append(finetune_arm(work, paths, args, universal, "universal_frozen", min(args.cases), "backbone"))
    transfer[-1]["arm"] = "universal"
    results: dict[str, Any] = {"transfer": transfer}
    if not args.skip_incremental:
        results["incremental"] = incremental(work, paths, args, universal, work / f"ft_universal_{max(args.cases)}")
    results["meta"] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": commit(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "command": ".venv/bin/python bench/adaptation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "held_out": args.held_out, "seed": args.seed, "scale": args.scale, "patch": args.patch,
        "pretrain_steps": args.pretrain_steps, "pretrain_lr": args.pretrain_lr,
        "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
        "rehearsal_cases": args.rehearsal_cases, "distill_weight": args.distill_weight,
        "gate_cases": args.gate_cases, "cases": args.cases, "total_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(work / "results.json", results)
    log(f"results: {work / 'results.json'}")
    if args.doc is not None:
        atomic_write_text(args.doc, render(results))
        log(f"report: {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
