"""bench/medcontext.py --grid: the grid file's arms and their checks, run keys (resume), the
train-log summary and the report's paired difference with a seed-and-case bootstrap. No training."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from hermes.config import TrainConfig
from hermes.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GRID_FILE = REPO / "bench" / "medcontext_grid.yaml"
DEFAULTS = {"enabled": True, "mask_patch": [4, 4, 4], "exclude_tasks": ["D/lesion"], "term_gradients_every": 15}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


grid = _load("medcontext_grid")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------- grid file
def test_the_committed_grid_has_the_issue_arms_and_each_resolves() -> None:
    arms = grid.load_grid(GRID_FILE)
    assert list(arms) == ["default", "w10", "frac30", "ratio03", "patch8", "tubes", "cons_only", "ramp", "cosine",
                          "ema_only"]
    resolved = {name: grid.resolve_arm(o, DEFAULTS, steps=300) for name, o in arms.items()}
    assert resolved["default"] == DEFAULTS
    assert resolved["ramp"]["masked_rampup_steps"] == 150  # half of the run
    assert resolved["ema_only"]["mask_ratio"] == 0.0
    assert resolved["patch8"]["mask_patch"] == [8, 8, 8]
    assert resolved["cons_only"] == {**DEFAULTS, "masked_supervision_weight": 0.0, "consistency_target_fraction": 0.3}
    assert resolved["tubes"]["mask_shape"] == "tubes"
    assert resolved["cosine"]["teacher_momentum_schedule"] == "cosine"
    assert resolved["w10"]["consistency_weight"] == 10.0
    assert grid.resolve_arm({"masked_rampup_fraction": 0.5}, DEFAULTS, steps=75)["masked_rampup_steps"] == 38


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("arms:\n  a: {mask_ratoi: 0.3}\n", r"grid\.yaml: arm 'a': unknown key 'mask_ratoi'"),
        ("arms:\n  a: {mask_ratio: 1.5}\n", r"grid\.yaml: arm 'a': .*mask_ratio"),
        ("arms:\n  b: {enabled: false}\n", r"arm 'b': `enabled` cannot be set"),
        ("arms:\n  baseline: {}\n", r"arm 'baseline': the name 'baseline' is reserved"),
        ("arms:\n  'a b': {}\n", r"arm 'a b': arm names"),
        ("arms:\n  r: {masked_rampup_fraction: 0.5, masked_rampup_steps: 10}\n", r"arm 'r': give .* not both"),
        ("arms:\n  r: {masked_rampup_fraction: 2}\n", r"arm 'r': masked_rampup_fraction must be a number in \[0, 1\]"),
        ("arms:\n  c: {teacher_momentum_schedule: cosine, reuse_validation_ema: true}\n", r"arm 'c': .*cosine"),
        ("arms:\n  t: [1, 2]\n", r"arm 't': overrides must be a mapping"),
        ("arm:\n  a: {}\n", r"grid\.yaml: the grid file needs exactly one top-level key `arms`"),
        ("arms: {}\n", r"needs exactly one top-level key `arms`"),
    ],
)
def test_bad_arms_are_errors_naming_file_and_arm(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grid.load_grid(write(tmp_path, text))


def test_an_empty_arm_is_the_bench_settings(tmp_path: Path) -> None:
    arms = grid.load_grid(write(tmp_path, "arms:\n  plain:\n  w2: {consistency_weight: 2}\n"))
    assert arms == {"plain": {}, "w2": {"consistency_weight": 2}}


# ------------------------------------------------------------------------------------- resume keys
def test_run_key_changes_with_the_arm_config_and_finished_runs_are_found(tmp_path: Path) -> None:
    settings = {"architecture": "hermes_resunet", "patch": [32, 32, 32], "num_workers": 0}
    mc = grid.resolve_arm({"consistency_weight": 10}, DEFAULTS, 300)
    key = grid.run_key(settings, 3, 0, "w10", 300, mc)
    same = grid.run_key(dict(settings), 3, 0, "w10", 300, dict(reversed(list(mc.items()))))
    assert grid.key_id(key) == grid.key_id(same)  # key order does not matter
    changed = grid.run_key(settings, 3, 0, "w10", 300, grid.resolve_arm({"consistency_weight": 5}, DEFAULTS, 300))
    others = [
        changed,
        grid.run_key(settings, 3, 1, "w10", 300, mc),  # seed
        grid.run_key(settings, 6, 0, "w10", 300, mc),  # shots
        grid.run_key(settings, 3, 0, "w10b", 300, mc),  # arm name
        grid.run_key(settings, 3, 0, "w10", 450, mc),  # steps
        grid.run_key({**settings, "num_workers": 1}, 3, 0, "w10", 300, mc),
    ]
    ids = {grid.key_id(k) for k in [key, *others]}
    assert len(ids) == 1 + len(others)
    base = grid.run_key(settings, 3, 0, grid.BASELINE, 300, None)

    results = tmp_path / "results.jsonl"
    old_mode = {"shots": 3, "seed": 0, "variant": "baseline", "steps": 150, "patch": [32, 32, 32], "scale": 0.5}
    lines = [old_mode, {"grid_key": key, "dice": 0.5}, {"grid_key": base, "dice": 0.4}]
    results.write_text("".join(json.dumps(row) + "\n" for row in lines) + "\n")
    done = grid.finished_runs(results)
    assert set(done) == {grid.key_id(key), grid.key_id(base)}  # the old mode's row is not a grid run
    assert grid.key_id(changed) not in done  # a changed arm trains again
    assert grid.finished_runs(tmp_path / "missing.jsonl") == {}


def test_grid_run_config_is_a_valid_train_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # bench/medcontext.py imports its sibling
    bench = _load("medcontext")
    args = SimpleNamespace(precision="fp32", architecture="hermes_resunet", patch=[32, 32, 32], steps=300,
                           mask_patch=[4, 4, 4], scale=0.5, cohort_seed=0, test_cases=4)
    names = ["D1/liver", "D1/liver_tumour", "D2/lesion"]
    defaults = bench.grid_medcontext(args, names)
    assert defaults["exclude_tasks"] == ["D1/liver_tumour", "D2/lesion"] and defaults["term_gradients_every"] == 20
    assert [bench.term_gradients_every(n) for n in (4, 150, 300, 1000)] == [10, 10, 20, 50]
    medcontext = grid.resolve_arm({"mask_shape": "tubes", "masked_rampup_fraction": 0.5}, defaults, args.steps)
    config = bench.run_config(tmp_path / "c.yaml", tmp_path / "cache", tmp_path / "out", 1, 300, args, medcontext,
                              num_workers=0)
    parsed = TrainConfig.model_validate(config)
    assert parsed.data.num_workers == 0 and parsed.steps == 300
    assert parsed.medcontext.mask_shape == "tubes" and parsed.medcontext.masked_rampup_steps == 150
    baseline = TrainConfig.model_validate(bench.run_config(tmp_path / "c.yaml", tmp_path / "cache", tmp_path / "o",
                                                           1, 510, args, None, num_workers=0))
    assert not baseline.medcontext.enabled and baseline.steps == 510
    assert bench.grid_settings(args)["num_workers"] == 0


# ------------------------------------------------------------------------------------- train log
def test_log_summary_step_time_skips_term_gradient_windows_and_averages_the_tail() -> None:
    rows = []
    for step in range(10, 110, 10):
        row = {"step": float(step), "steps_per_s": 2.0, "seg": step / 100, "consistency": 0.01}
        if step % 30 == 0:  # a window with a term-gradient measurement: slower, has grad shares
            row.update(steps_per_s=1.0, grad_share_supervised=0.9, grad_share_consistency=0.1)
        rows.append(row)
    summary = grid.log_summary(rows)
    assert summary["step_s"] == pytest.approx(0.5)
    assert summary["step_s_all"] == pytest.approx((7 * 10 * 0.5 + 3 * 10 * 1.0) / 100)
    tail = summary["tail"]  # rows with step > 80: 90 and 100
    assert tail["seg"] == pytest.approx(0.95) and tail["consistency"] == pytest.approx(0.01)
    assert tail["grad_share_consistency"] == pytest.approx(0.1)  # from the one measured row (90)
    assert "masked_supervised" not in tail  # a baseline log has no MedContext columns


# ------------------------------------------------------------------------------------- report
def fake_run(seed: int, offset: float, rng_seed: int = 0) -> dict:
    """A run scored on 2 datasets x 5 cases x 2 tasks; Dice = a fixed per-case value + offset."""
    cases = []
    for d, dataset in enumerate(("A", "B")):
        for c in range(5):
            for t, task in enumerate(("x", "y")):
                value = 0.3 + 0.1 * c + 0.05 * t + 0.02 * d + offset
                cases.append({"dataset": dataset, "case": f"c{c}", "task": f"{dataset}/{task}",
                              "dice": None if (c, t) == (4, 1) else value})  # one both-empty pair
    dice = sum(v["dice"] for v in cases if v["dice"] is not None) / sum(v["dice"] is not None for v in cases)
    return {"seed": seed, "dice": dice, "cases": cases,
            "log": {"step_s": 0.5, "tail": {"seg": 0.7, "consistency": 0.01, "weight_consistency": 21.0,
                                            "grad_share_supervised": 0.8, "grad_share_masked_supervised": 0.15,
                                            "grad_share_consistency": 0.05}}}


def test_paired_difference_is_arm_minus_baseline_and_its_ci_resamples_seeds() -> None:
    base = {s: fake_run(s, 0.0) for s in (0, 1, 2)}
    # The same improvement on every case and seed: no spread at all.
    flat = grid.compare({s: fake_run(s, 0.05) for s in (0, 1, 2)}, base, samples=500)
    assert flat["diff"] == pytest.approx(0.05)
    assert flat["ci95"][0] == pytest.approx(0.05) and flat["ci95"][1] == pytest.approx(0.05)
    assert flat["per_seed"] == pytest.approx([0.05, 0.05, 0.05])
    # Seed-dependent differences, identical on every case: a case-only bootstrap would give a
    # zero-width interval; resampling seeds widens it to the seeds' range.
    arm = {s: fake_run(s, d) for s, d in zip((0, 1, 2), (-0.06, 0.0, 0.03))}
    result = grid.compare(arm, base, samples=2000)
    assert result["diff"] == pytest.approx(-0.01)
    assert result["per_seed"] == pytest.approx([-0.06, 0.0, 0.03])
    low, high = result["ci95"]
    assert -0.06 - 1e-9 <= low < -0.02 and 0.0 < high <= 0.03 + 1e-9
    assert result["per_dataset"] == pytest.approx({"A": -0.01, "B": -0.01})
    # Only common seeds are paired; nothing in common: no comparison.
    assert grid.compare({0: arm[0], 5: fake_run(5, 0.0)}, base)["seeds"] == [0]
    assert grid.compare({7: arm[0]}, base) is None


def test_arm_table_has_one_row_per_arm_after_the_baseline() -> None:
    base = {s: fake_run(s, 0.0) for s in (0, 1)}
    arms = {"w10": {s: fake_run(s, 0.02) for s in (0, 1)}, "tubes": {}}
    lines = grid.arm_table(arms, base, samples=200)
    assert lines[2].startswith("| baseline (2 seeds) |")
    assert lines[3].startswith("| w10 |") and "| +0.020 | [+0.020, +0.020] | +0.020, +0.020 |" in lines[3]
    assert "0.80 / 0.15 / 0.05" in lines[3] and "| 21 |" in lines[3]
    assert lines[4] == "| tubes | not run yet | | | | | | | | | |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    per_dataset = grid.dataset_table(arms, base, samples=200)
    assert per_dataset[0] == "| arm | A | B |" and per_dataset[2] == "| w10 | +0.020 | +0.020 |"
    assert not math.isnan(grid.compare(arms["w10"], base, samples=10)["dice_mean"])
