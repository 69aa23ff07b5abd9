"""bench/nnunet_peer.py: nnU-Net v2 planned, trained, predicted and scored with Hermes' evaluation,
end to end on a tiny synthetic dataset (3 training + 2 test cases of ~34x25x20 voxels)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "nnunet_peer.py"
NNUNET_MISSING = [m for m in ("nnunetv2", "dynamic_network_architectures") if importlib.util.find_spec(m) is None]


def run_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    # The worktree's hermes first on the path (the venv may hold an editable install of another checkout).
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    from hermes.synthetic import generate_cohort

    (folder,) = generate_cohort(tmp_path / "raw", seed=0, scale=0.35, datasets=["101"], cases=3, test_cases=2,
                                progress=False)
    return folder


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_refuses_a_dataset_without_test_labels(tiny_dataset: Path, tmp_path: Path) -> None:
    shutil.rmtree(tiny_dataset / "labelsTs")
    done = run_script("--data", tiny_dataset, "--work", tmp_path / "work", "--epochs", "1")
    assert done.returncode == 2
    assert f"{tiny_dataset / 'labelsTs'}: not found" in done.stderr
    assert not (tmp_path / "work").exists()


def test_refuses_a_work_folder_that_holds_the_raw_data(tiny_dataset: Path) -> None:
    before = _listing(tiny_dataset)
    done = run_script("--data", tiny_dataset, "--work", tiny_dataset.parent, "--epochs", "1", "--overwrite")
    assert done.returncode == 2 and "overlaps the raw dataset" in done.stderr
    assert _listing(tiny_dataset) == before


@pytest.mark.slow
@pytest.mark.skipif(bool(NNUNET_MISSING), reason=f"nnU-Net v2 not importable (missing {', '.join(NNUNET_MISSING)})")
def test_trains_predicts_and_scores_end_to_end(tiny_dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    before = _listing(tiny_dataset)
    done = run_script("--data", tiny_dataset, "--work", work, "--epochs", "1", "--iterations-per-epoch", "2",
                      "--threads", "1", "--no-mirroring")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    name = tiny_dataset.name
    result = json.loads((work / name / "result.json").read_text())
    tasks = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]
    assert result["n_test_cases"] == 2 and result["epochs_completed"] == 1 and result["iterations_per_epoch"] == 2
    assert sorted(result["metrics"]["tasks"]) == sorted(tasks)
    for metric in ("dice", "nsd", "hd95"):
        assert math.isfinite(result["metrics"]["mean"][metric])
        assert all(math.isfinite(t[metric]) for t in result["metrics"]["tasks"].values())
    assert set(result["wall_s"]) >= {"plan_preprocess", "training", "prediction", "total"}
    assert result["nnunet_version"] and result["threads"] == 1 and result["fold"] == "all"
    # Hermes' own per-case rows: every test case x task scored, all finite.
    with open(work / name / "evaluation" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({r["case"] for r in rows}) == ["abdomenct_test000", "abdomenct_test001"]
    assert len(rows) == 2 * len(tasks)
    assert all(math.isfinite(float(r[m])) for r in rows for m in ("dice", "nsd", "hd95"))
    report = (work / "nnunet_peer.md").read_text()
    assert f"| **{name}** | **mean** | 2 |" in report
    assert _listing(tiny_dataset) == before  # the raw data is only read

    again = run_script("--data", tiny_dataset, "--work", work, "--epochs", "1")
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    assert json.loads((work / name / "result.json").read_text()) == result
