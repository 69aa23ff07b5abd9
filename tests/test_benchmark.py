"""hermes benchmark: budget rules, config layering, resumability, the paired case bootstrap,
summary.json and its merge, argument errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hermes.cli import main as hermes_main
from hermes.errors import ConfigError
from hermes.evaluation.benchmark import MODELS, BenchmarkOptions, Run, plan_runs, run_config, user_layer
from hermes.evaluation.benchmark_report import aggregate, merge_summary
from hermes.evaluation.evaluate import summarize
from hermes.evaluation.paired import dataset_scores, paired_difference


def _rows(dataset: str, scores: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    return [{"dataset": dataset, "case": c, "task": t, "dice": v} for c, tasks in scores.items() for t, v in tasks.items()]


# --------------------------------------------------------------------------------------------
# Paired bootstrap on constructed numbers
# --------------------------------------------------------------------------------------------
def test_constant_paired_difference_collapses_the_ci_even_with_spread_cases() -> None:
    """b is a minus 0.05 on every (case, task) while cases range from 0.1 to 0.9: resampling the
    same case ids for both models gives exactly 5 points in every replicate. Unpaired
    resampling, or matching rows by position (b's rows are shuffled), would not."""
    rng = np.random.default_rng(1)
    rows_a, rows_b = {}, {}
    for seed in (0, 1):
        a = {f"c{i}": {"t1": float(rng.uniform(0.1, 0.9)), "t2": float(rng.uniform(0.1, 0.9))} for i in range(8)}
        rows_a[seed] = _rows("A", a)
        shuffled = _rows("A", {c: {t: v - 0.05 for t, v in tasks.items()} for c, tasks in a.items()})
        random.Random(seed).shuffle(shuffled)
        rows_b[seed] = shuffled
    result = paired_difference(rows_a, rows_b, ["A"], samples=2000)
    assert result.mean_diff == pytest.approx(5.0)
    assert result.ci95 == pytest.approx((5.0, 5.0))
    assert result.per_dataset_ci95["A"] == pytest.approx((5.0, 5.0))
    assert result.per_seed == pytest.approx({0: 5.0, 1: 5.0})
    assert result.n_cases == {"A": 8} and result.seeds == [0, 1]


def test_known_bootstrap_distribution_and_seed_averaging() -> None:
    """Two cases with differences 0 and 10 points: the resampled mean is 0, 5 or 10 (p 1/4, 1/2,
    1/4), so the 95 % interval is [0, 10]. A second seed with a constant 1 point difference is
    averaged in per replicate: {0.5, 3, 5.5}."""
    a0 = _rows("A", {"x": {"t": 0.5}, "y": {"t": 0.6}})
    b0 = _rows("A", {"x": {"t": 0.5}, "y": {"t": 0.5}})
    one = paired_difference({0: a0}, {0: b0}, ["A"], samples=4000)
    assert one.mean_diff == pytest.approx(5.0) and one.ci95 == pytest.approx((0.0, 10.0))
    a1 = _rows("A", {"x": {"t": 0.31}, "y": {"t": 0.81}})
    b1 = _rows("A", {"x": {"t": 0.30}, "y": {"t": 0.80}})
    two = paired_difference({0: a0, 1: a1}, {0: b0, 1: b1}, ["A"], samples=4000)
    assert two.mean_diff == pytest.approx(3.0)
    assert two.ci95 == pytest.approx((0.5, 5.5))
    assert two.per_seed == pytest.approx({0: 5.0, 1: 1.0})


def test_overall_difference_is_the_mean_over_datasets() -> None:
    a = _rows("A", {"x": {"t": 0.5}, "y": {"t": 0.9}}) + _rows("B", {"z": {"t": 0.7}, "w": {"t": 0.2}})
    b = _rows("A", {"x": {"t": 0.48}, "y": {"t": 0.88}}) + _rows("B", {"z": {"t": 0.64}, "w": {"t": 0.14}})
    result = paired_difference({0: a}, {0: b}, ["A", "B"], samples=500)
    assert result.per_dataset == pytest.approx({"A": 2.0, "B": 6.0})
    assert result.mean_diff == pytest.approx(4.0) and result.ci95 == pytest.approx((4.0, 4.0))


def test_case_score_matches_the_table_score_with_unscored_pairs() -> None:
    """The bootstrap's statistic is the table's dataset mean (mean over tasks of per-task means,
    NaN left out), not the mean of per-case means."""
    nan = float("nan")
    values = np.array([[0.9, nan], [0.5, 0.1], [0.7, 0.3]])
    rows = [
        {"dataset": "A", "case": f"c{i}", "task": f"t{j}", "dice": values[i, j], "hd95": 1.0, "nsd": 1.0,
         "ref_empty": False, "false_positive": False}
        for i in range(3) for j in range(2)
    ]  # fmt: skip
    table = summarize(rows)["datasets"]["A"]["mean"]["dice"]["mean"]
    assert dataset_scores(values, np.ones((1, 3)))[0] == pytest.approx(table)  # 0.45, case means give 0.5
    assert table == pytest.approx(0.45)


def test_paired_difference_needs_a_common_seed() -> None:
    rows = _rows("A", {"x": {"t": 0.5}})
    with pytest.raises(Exception, match="no seed scored by both"):
        paired_difference({0: rows}, {1: rows}, ["A"])


# --------------------------------------------------------------------------------------------
# Planning: budget rules and config layering (no training)
# --------------------------------------------------------------------------------------------
def _options(tmp_path: Path, **kwargs: object) -> BenchmarkOptions:
    base: dict[str, object] = {"work": tmp_path, "synthetic": True, "models": ["resunet", "hermes_r", "shared_resunet"],
                               "seeds": [0, 1], "steps": 30}  # fmt: skip
    return BenchmarkOptions(**{**base, **kwargs})  # type: ignore[arg-type]


def test_budget_rules_set_the_steps_of_each_run(tmp_path: Path) -> None:
    # Three training datasets, C has no test cases: no per-dataset model for it, but the
    # universal model covers it, so N = 3.
    runs = plan_runs(_options(tmp_path), ["A", "B", "C"], ["A", "B"])
    steps = {(r.row.key, r.dataset, r.seed): r.steps for r in runs}
    assert steps[("hermes_r", None, 0)] == steps[("shared_resunet", None, 1)] == 90
    assert steps[("resunet", "A", 0)] == steps[("resunet", "B", 1)] == 30
    assert ("resunet", "C", 0) not in steps and len(runs) == 2 * (2 + 1 + 1)
    equal = plan_runs(_options(tmp_path, budget_rule="equal_steps"), ["A", "B", "C"], ["A", "B"])
    assert {r.steps for r in equal} == {30}


def test_config_layers_recipe_then_flags_then_the_run(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("loss: {reduction: pair}\ndata: {task_balance: 0.5, batch_size: 4}\noptim: {lr: 0.001}\n")
    layer = user_layer(_options(tmp_path, recipe=recipe, preset="cpu-demo", lr=0.003))
    run = Run(MODELS["shared_resunet"], None, 1, 90, ("A",))
    config = run_config(run, layer, tmp_path / "c.yaml", tmp_path / "cache", tmp_path / "out", 0)
    assert config["loss"]["reduction"] == "pair" and config["data"]["task_balance"] == 0.5
    assert config["data"]["batch_size"] == 4  # recipe over the benchmark default (2)
    assert config["data"]["patch_size"] == [48, 48, 48]  # the preset over the benchmark default (32)
    assert config["optim"]["lr"] == 0.003  # the flag over the recipe
    assert config["steps"] == 90 and config["seed"] == 1 and config["paradigm"] == "universal"
    assert config["model"]["architecture"] == "resunet" and "dataset" not in config
    assert config["validation"]["every_steps"] == 250  # the preset's, not the benchmark's default (90)
    plain = run_config(Run(MODELS["resunet"], "A", 0, 30, ("A",)), user_layer(_options(tmp_path)),
                       tmp_path / "c.yaml", tmp_path / "cache", tmp_path / "out", 0)
    assert plain["validation"]["every_steps"] == 30 and plain["dataset"] == "A"
    assert plain["paradigm"] == "traditional" and plain["data"]["patch_size"] == [32, 32, 32]


def test_recipe_may_not_set_what_the_benchmark_decides(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps: 100\nmodel: {architecture: resunet}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: steps, model.architecture are set by hermes benchmark"):
        user_layer(_options(tmp_path, recipe=recipe))


def test_cli_errors_are_one_line_and_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    assert hermes_main(["benchmark", "--synthetic", "--work", str(work), "--models", "resunet", "unet3000"]) == 2
    assert "--models: unknown model unet3000; known: resunet" in capsys.readouterr().err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("loss: {reduktion: pair}\n")
    assert hermes_main(["benchmark", "--synthetic", "--work", str(work), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"invalid config {recipe}" in err and "loss.reduktion: unknown key" in err
    assert not (work / "cohort").exists()  # refused before generating anything
    assert hermes_main(["benchmark", "--synthetic", "--work", str(work), "--compare", "hermes_r:nope"]) == 2
    assert "--compare hermes_r:nope: unknown model 'nope'" in capsys.readouterr().err
    bad = tmp_path / "summary.json"
    bad.write_text("{not json")
    assert hermes_main(["benchmark", "--synthetic", "--work", str(work), "--summary-into", str(bad)]) == 2
    assert f"--summary-into {bad}: not a readable JSON file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Tables and summary files
# --------------------------------------------------------------------------------------------
def test_aggregate_mean_only_over_complete_seeds() -> None:
    def run(model: str, dataset: str | None, seed: int, scores: dict[str, float]) -> dict[str, object]:
        return {"model": model, "label": model, "paradigm": "x", "dataset": dataset, "seed": seed, "steps": 2,
                "datasets": {d: {"dice": v, "hd95": 1.0, "nsd": v, "tasks": {f"{d}/t": {"dice": v}}}
                             for d, v in scores.items()}}  # fmt: skip

    results = [
        run("hermes_r", None, 0, {"A": 0.5, "B": 0.7}),
        run("hermes_r", None, 1, {"A": 0.7, "B": 0.9}),
        run("resunet", "A", 0, {"A": 0.6}),
        run("resunet", "B", 0, {"B": 0.8}),
        run("resunet", "A", 1, {"A": 0.4}),  # seed 1 lacks dataset B: no mean for it
    ]
    table = aggregate(results, ["A", "B"], ["resunet", "hermes_r"])
    assert table["hermes_r"]["metrics"]["dice"]["mean_over_datasets"] == {"0": 0.6, "1": 0.8}
    assert table["resunet"]["metrics"]["dice"]["mean_over_datasets"] == pytest.approx({"0": 0.7})
    assert table["resunet"]["metrics"]["dice"]["tasks"]["A/t"] == {"0": 0.6, "1": 0.4}


def test_summary_into_replaces_same_key_and_keeps_others(tmp_path: Path) -> None:
    path = tmp_path / "paradigm_summary.json"
    old = {"data": "synthetic", "budget_rule": "equal_total_compute", "a": "hermes_r", "b": "resunet", "mean_diff": -1.0}
    other = {"data": "realmini", "budget_rule": "equal_total_compute", "a": "hermes_r", "b": "resunet", "mean_diff": 2.0}
    path.write_text(json.dumps({"note": "kept", "comparisons": [old, other]}))
    new = {**old, "mean_diff": 1.5}
    added = {**old, "budget_rule": "equal_steps", "mean_diff": 0.5}
    longer = {**old, "steps_per_dataset": 1200, "mean_diff": 3.0}  # another budget: kept apart
    merge_summary(path, [new, added, longer])
    data = json.loads(path.read_text())
    assert data["note"] == "kept"
    assert [c["mean_diff"] for c in data["comparisons"]] == [1.5, 2.0, 0.5, 3.0]
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected an object with a list under"):
        merge_summary(path, [new])


# --------------------------------------------------------------------------------------------
# End to end (tiny: 2 datasets, 2 training + 2 test cases, 2-4 steps, 32^3, 2 seeds)
# --------------------------------------------------------------------------------------------
def _cli(work: Path, *extra: str) -> list[str]:
    return [
        "benchmark", "--synthetic", "--work", str(work), "--scale", "0.5", "--cases", "2", "--test-cases", "2",
        "--synthetic-datasets", "LiverCT", "LesionPET", "--steps", "2", "--val-fraction", "0",
        "--bootstrap-samples", "200", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_equal_total_compute_end_to_end_resumes_and_merges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    argv = _cli(work, "--models", "resunet", "shared_resunet", "--seeds", "0", "1")
    assert hermes_main(argv) == 0
    first = capsys.readouterr().out
    assert first.count(": training ") == 6

    for seed in (0, 1):
        universal = json.loads((work / "runs/shared_resunet/universal" / f"seed{seed}/result.json").read_text())
        spec = json.loads((work / "runs/shared_resunet/universal" / f"seed{seed}/train/model/spec.json").read_text())
        assert universal["steps"] == spec["training"]["steps"] == 4  # N x S: 2 datasets x 2 steps
        assert universal["final_weights"] == spec["training"]["final_weights"] in ("ema", "raw")
        for dataset in ("LiverCT", "LesionPET"):
            own = json.loads((work / "runs/resunet" / dataset / f"seed{seed}/result.json").read_text())
            assert own["steps"] == 2 and own["budget_rule"] == "equal_total_compute"
            assert {c["case"] for c in own["cases"]} == {c["case"] for c in universal["cases"] if c["dataset"] == dataset}

    summary = json.loads((work / "summary.json").read_text())
    (entry,) = summary["comparisons"]  # only shared_resunet - resunet has both models
    assert {k: entry[k] for k in ("data", "budget_rule", "a", "b", "seeds")} == {
        "data": "synthetic", "budget_rule": "equal_total_compute", "a": "shared_resunet", "b": "resunet", "seeds": [0, 1],
    }  # fmt: skip
    assert entry["ci95"][0] <= entry["mean_diff"] <= entry["ci95"][1]
    assert set(entry["per_dataset"]) == {"LiverCT", "LesionPET"}
    assert entry["mean_diff"] == pytest.approx(np.mean(list(entry["per_dataset"].values())), abs=2e-3)
    table = json.loads((work / "paradigm.json").read_text())["table"]
    dice = {k: np.mean([float(v) for v in table[k]["metrics"]["dice"]["mean_over_datasets"].values()]) for k in table}
    assert entry["mean_diff"] == pytest.approx(100 * (dice["shared_resunet"] - dice["resunet"]), abs=2e-3)
    md = (work / "paradigm.md").read_text()
    assert "Budget rule **equal total compute**" in md and "2 x 2 = 4 steps" in md
    assert "| ResUNet (shared) - ResUNet | 0,1 |" in md

    # Second invocation: nothing trained, the comparisons merged into an existing file.
    into = tmp_path / "paradigm_summary.json"
    into.write_text(json.dumps({"comparisons": [{"data": "realmini", "budget_rule": "equal_steps", "a": "x", "b": "y"}]}))
    assert hermes_main([*argv, "--summary-into", str(into)]) == 0
    second = capsys.readouterr().out
    assert ": training " not in second and second.count("done earlier, skipped") == 6
    merged = json.loads(into.read_text())["comparisons"]
    assert [c["data"] for c in merged] == ["realmini", "synthetic"] and merged[1]["mean_diff"] == entry["mean_diff"]

    # A run interrupted after its last checkpoint (no model, no result) resumes, not restarts.
    run_dir = work / "runs/resunet/LiverCT/seed0"
    for name in ("result.json", "train_timing.json"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "train/model")
    # --report-only trains nothing, neither the unfinished run nor a seed never started.
    assert hermes_main([*_cli(work, "--models", "resunet", "shared_resunet", "--seeds", "0", "1", "2"), "--report-only"]) == 0
    report_only = capsys.readouterr().out
    assert ": training " not in report_only and report_only.count("not trained (--report-only)") == 4
    assert not (run_dir / "result.json").exists() and not (work / "runs/resunet/LiverCT/seed2").exists()
    assert hermes_main(argv) == 0
    third = capsys.readouterr().out
    assert third.count(": training ") == 1 and third.count("done earlier, skipped") == 5
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["resumed"] is True and resumed["steps"] == 2

    # Other settings on the same WORK are refused before anything runs.
    assert hermes_main([*argv, "--budget-rule", "equal_steps"]) == 2
    assert "holds runs made with other settings (budget_rule" in capsys.readouterr().err


@pytest.mark.slow
def test_equal_steps_gives_the_universal_model_s_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    argv = _cli(work, "--models", "shared_resunet", "--seeds", "0", "--budget-rule", "equal_steps")
    assert hermes_main(argv) == 0
    result = json.loads((work / "runs/shared_resunet/universal/seed0/result.json").read_text())
    assert result["steps"] == result["planned_steps"] == 2 and result["budget_rule"] == "equal_steps"
    assert "Budget rule **equal steps**" in (work / "paradigm.md").read_text()
    assert json.loads((work / "summary.json").read_text()) == {"comparisons": []}


def test_bench_script_forwards_to_the_subcommand() -> None:
    script = Path(__file__).resolve().parents[1] / "bench" / "paradigm.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0 and "usage: hermes benchmark" in done.stdout and "--budget-rule" in done.stdout


def test_a_run_locked_by_another_process_is_not_taken(tmp_path: Path) -> None:
    from hermes.evaluation.benchmark import file_lock

    with file_lock(tmp_path / ".lock") as held:
        assert held
        with file_lock(tmp_path / ".lock", blocking=False) as second:
            assert not second  # flock: a second open file description conflicts, as another process would
    with file_lock(tmp_path / ".lock", blocking=False) as again:
        assert again


def test_deadline_is_the_next_occurrence_of_the_clock_time() -> None:
    """A benchmark started at 23:20 with --deadline 00:20 has an hour, not a deadline already past."""
    import datetime

    from hermes.evaluation.benchmark import _deadline

    evening = datetime.datetime(2026, 12, 1, 23, 20)
    assert _deadline("00:20", now=evening) == datetime.datetime(2026, 12, 2, 0, 20)
    assert _deadline("23:50", now=evening) == datetime.datetime(2026, 12, 1, 23, 50)
    assert _deadline("23:20", now=evening) == datetime.datetime(2026, 12, 2, 23, 20)
    assert _deadline(None) is None
    for bad in ("25:00", "noon", "12"):
        with pytest.raises(ConfigError, match="HH:MM"):
            _deadline(bad, now=evening)
