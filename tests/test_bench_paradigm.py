"""bench/paradigm.py: a 2-step budget on a tiny synthetic cohort writes the table and the JSON,
and a second invocation skips the finished runs (run-level resume)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "paradigm.py"


def _load_script():  # returns the bench script as a module
    spec = importlib.util.spec_from_file_location("bench_paradigm", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_paradigm"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_step_budget_writes_table_and_json_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paradigm = _load_script()
    work = tmp_path / "work"
    argv = [
        "--synthetic", "--work", str(work), "--scale", "0.5", "--cases", "2", "--test-cases", "1",
        "--synthetic-datasets", "LiverCT", "LesionPET", "--steps", "2", "--seeds", "0",
        "--models", "resunet", "hermes_r",
    ]  # fmt: skip
    assert paradigm.main(argv) == 0
    first = capsys.readouterr().out

    data = json.loads((work / "paradigm.json").read_text())
    assert data["datasets"] == ["LiverCT", "LesionPET"]
    assert set(data["table"]) == {"resunet", "hermes_r"}
    runs = {(r["model"], r["dataset"]) for r in data["runs"]}
    assert runs == {("resunet", "LiverCT"), ("resunet", "LesionPET"), ("hermes_r", None)}
    for run in data["runs"]:
        assert run["steps"] == 2 and run["parameters"] > 0
        for entry in run["datasets"].values():
            assert 0.0 <= entry["dice"] <= 1.0 and 0.0 <= entry["nsd"] <= 1.0
    # The traditional row's cells come from two separate models, one per dataset.
    cells = data["table"]["resunet"]["metrics"]["dice"]["cells"]
    assert set(cells) == {"LiverCT", "LesionPET"} and all("0" in c for c in cells.values())

    table = (work / "paradigm.md").read_text()
    assert "Budget rule: every model" in table and "2x the universal model's compute" in table
    header = "| Model | Paradigm | seeds | LiverCT | LesionPET | Mean |"
    assert table.count(header) == 3  # Dice, NSD, HD95
    assert "| ResUNet | traditional | 0 |" in table and "| Hermes-R | universal | 0 |" in table
    assert first.count("training 2 steps") == 3

    # Second invocation: nothing retrained, same table.
    assert paradigm.main(argv) == 0
    second = capsys.readouterr().out
    assert "training 2 steps" not in second and second.count("done earlier, skipped") == 3
    assert (work / "paradigm.md").read_text() == table


def test_aggregate_mean_only_over_complete_seeds() -> None:
    paradigm = _load_script()

    def run(model: str, dataset: str | None, seed: int, scores: dict[str, float]) -> dict[str, object]:
        return {"model": model, "dataset": dataset, "seed": seed,
                "datasets": {d: {"dice": v, "hd95": 1.0, "nsd": v} for d, v in scores.items()}}  # fmt: skip

    results = [
        run("hermes_r", None, 0, {"A": 0.5, "B": 0.7}),
        run("hermes_r", None, 1, {"A": 0.7, "B": 0.9}),
        run("resunet", "A", 0, {"A": 0.6}),
        run("resunet", "B", 0, {"B": 0.8}),
        run("resunet", "A", 1, {"A": 0.4}),  # seed 1 lacks dataset B: no mean for it
    ]
    table = paradigm.aggregate(results, ["A", "B"], ["resunet", "hermes_r"])
    assert table["hermes_r"]["metrics"]["dice"]["mean_over_datasets"] == {"0": 0.6, "1": 0.8}
    assert table["resunet"]["metrics"]["dice"]["mean_over_datasets"] == pytest.approx({"0": 0.7})
    meta = {"title": "t", "steps": 2, "batch": 2, "patch": 32, "preset": "tiny", "test_cases": "all",
            "nsd_tolerance_mm": 2.0}  # fmt: skip
    text = paradigm.markdown(table, ["A", "B"], meta)
    assert "| Hermes-R | universal | 0,1 | 60.0 ± 14.1 | 80.0 ± 14.1 | 70.0 ± 14.1 |" in text
    assert "| ResUNet | traditional | 0,1 | 50.0 ± 14.1 | 80.0 | 70.0 |" in text
