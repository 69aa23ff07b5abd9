"""`hermes evaluate`: folder scoring with known answers, summaries, report, model mode."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import make_model_dir

from hermes.cli import main
from hermes.config import EvaluationConfig, InferenceConfig
from hermes.data.imageio import save_image
from hermes.errors import DataError
from hermes.evaluation.evaluate import (
    bootstrap_ci,
    evaluate_folders,
    evaluate_model,
    read_label_file,
    summarize,
    write_outputs,
)

SHAPE = (20, 18, 12)
AFFINE = np.diag([1.0, 1.5, 3.0, 1.0])


def _labels() -> np.ndarray:
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[3:9, 3:9, 2:6] = 1  # 144 voxels
    ref[12:16, 10:15, 4:9] = 2  # 100 voxels
    return ref


@pytest.fixture()
def nnunet_layout(tmp_path: Path) -> tuple[Path, Path]:
    """Dataset folder with dataset.json + labelsTs/imagesTs, and a prediction folder.

    perfect: prediction == reference; missed: spleen missing; no_spleen: the reference lacks
    spleen but the prediction has it (a false positive on a scan lacking the class).
    """
    dataset = tmp_path / "Dataset900_Toy"
    (dataset / "labelsTs").mkdir(parents=True)
    (dataset / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}, "channel_names": {"0": "CT"},
                    "file_ending": ".nii.gz"})
    )
    pred = tmp_path / "pred"
    ref = _labels()
    rng = np.random.default_rng(0)
    for case, (ref_case, pred_case) in {
        "perfect": (ref, ref),
        "missed": (ref, np.where(ref == 2, 0, ref)),
        "no_spleen": (np.where(ref == 2, 0, ref), ref),
    }.items():
        save_image(dataset / "labelsTs" / f"{case}.nii.gz", ref_case, AFFINE)
        save_image(pred / f"{case}.nii.gz", pred_case.astype(np.uint8), AFFINE)
        save_image(dataset / "imagesTs" / f"{case}_0000.nii.gz", rng.normal(size=SHAPE).astype(np.float32), AFFINE)
    return dataset, pred


def test_folder_scores_with_known_answers(nnunet_layout: tuple[Path, Path]) -> None:
    dataset, pred = nnunet_layout
    result = evaluate_folders(pred, dataset / "labelsTs", config=EvaluationConfig(workers=1), progress=False)
    rows = {(r["case"], r["task"]): r for r in result.rows}
    assert len(rows) == 6
    assert rows[("perfect", "liver")]["dice"] == 1.0 and rows[("perfect", "liver")]["hd95"] == 0.0
    diagonal = math.sqrt(20**2 + 27**2 + 36**2)
    missed = rows[("missed", "spleen")]
    assert (missed["dice"], missed["nsd"]) == (0.0, 0.0) and missed["hd95"] == pytest.approx(diagonal)
    fp = rows[("no_spleen", "spleen")]
    assert fp["dice"] == 0.0 and fp["false_positive"] and fp["ref_empty"]
    spleen = result.summary["datasets"]["Dataset900_Toy"]["tasks"]["spleen"]
    assert spleen["dice"]["mean"] == pytest.approx(1 / 3)  # 1, 0 (miss), 0 (false positive)
    assert spleen["n_false_positive"] == 1 and spleen["n_ref_empty"] == 1
    liver = result.summary["datasets"]["Dataset900_Toy"]["tasks"]["liver"]
    assert liver["dice"]["mean"] == 1.0 and liver["dice"]["ci95"] == [1.0, 1.0]
    assert result.summary["datasets"]["Dataset900_Toy"]["mean"]["dice"]["mean"] == pytest.approx((1 + 1 / 3) / 2)


def test_both_empty_is_excluded_not_counted_as_perfect() -> None:
    rows = [
        {"dataset": "D", "case": "a", "task": "t", "dice": 0.5, "hd95": 2.0, "nsd": 0.5, "ref_empty": False,
         "false_positive": False},
        {"dataset": "D", "case": "b", "task": "t", "dice": float("nan"), "hd95": float("nan"), "nsd": float("nan"),
         "ref_empty": True, "false_positive": False},
    ]
    stats = summarize(rows, EvaluationConfig(bootstrap_samples=50))["datasets"]["D"]["tasks"]["t"]
    assert stats["dice"]["mean"] == 0.5 and stats["dice"]["n"] == 1 and stats["n_cases"] == 2


def test_bootstrap_ci_brackets_the_mean_and_is_seeded() -> None:
    values = list(np.random.default_rng(3).uniform(0.5, 1.0, 40))
    lo, hi = bootstrap_ci(values, 2000, np.random.default_rng(0))  # type: ignore[misc]
    assert lo < float(np.mean(values)) < hi and hi - lo < 0.15
    assert bootstrap_ci(values, 2000, np.random.default_rng(0)) == (lo, hi)
    assert bootstrap_ci([float("nan")], 10, np.random.default_rng(0)) is None


def test_cli_writes_csv_summary_and_self_contained_report(nnunet_layout: tuple[Path, Path], tmp_path: Path,
                                                          capsys) -> None:
    dataset, pred = nnunet_layout
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(pred), "--ref", str(dataset / "labelsTs"), "-o", str(out), "--report",
                 "--workers", "1", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Dataset900_Toy (mean)" in printed and "spleen" in printed
    with open(out / "metrics.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6 and set(table[0]) >= {"dataset", "case", "task", "dice", "hd95", "nsd"}
    summary = json.loads((out / "summary.json").read_text())  # valid JSON: NaN written as null
    assert summary["overall"]["mean_over_datasets"]["dice"] == pytest.approx((1 + 1 / 3) / 2)
    html = (out / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,", html)
    assert len(images) >= 1 + 3  # box plot + best/median/worst overlays
    assert not re.search(r"(src|href)=['\"]https?://", html)  # opens offline
    from hermes.evaluation.report import overlay_files

    files = overlay_files(out / "report.html")  # the overlays also as PNG files, linked
    assert len(files) == 3 and all(f.is_file() and f.parent == out / "overlays" for f in files)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(f.name for f in files)


def test_prediction_label_names_are_matched_by_name(nnunet_layout: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, _ = nnunet_layout
    ref = _labels()
    pred = tmp_path / "hermes_pred"
    swapped = np.zeros_like(ref)
    swapped[ref == 1], swapped[ref == 2] = 2, 1  # Hermes numbers tasks in its own order
    for case in ("perfect", "missed", "no_spleen"):
        save_image(pred / f"{case}.nii.gz", swapped, AFFINE)
    (pred / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Toy/spleen": 1, "Toy/liver": 2}}))
    result = evaluate_folders(pred, dataset / "labelsTs", pred_labels=pred / "dataset.json",
                              config=EvaluationConfig(workers=1), progress=False)
    perfect = {r["task"]: r["dice"] for r in result.rows if r["case"] == "perfect"}
    assert perfect == {"liver": 1.0, "spleen": 1.0}
    assert read_label_file(dataset / "dataset.json") == {"liver": (1,), "spleen": (2,)}


def test_errors_name_the_problem(nnunet_layout: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, pred = nnunet_layout
    (pred / "perfect.nii.gz").unlink()
    with pytest.raises(DataError, match=r"no prediction for reference case.*perfect"):
        evaluate_folders(pred, dataset / "labelsTs", progress=False)
    save_image(pred / "perfect.nii.gz", _labels(), np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(DataError, match=r"perfect\.nii\.gz: geometry differs from the reference"):
        evaluate_folders(pred, dataset / "labelsTs", config=EvaluationConfig(workers=1), progress=False)


def test_parallel_scoring_equals_serial(nnunet_layout: tuple[Path, Path]) -> None:
    dataset, pred = nnunet_layout
    serial = evaluate_folders(pred, dataset / "labelsTs", config=EvaluationConfig(workers=1), progress=False)
    parallel = evaluate_folders(pred, dataset / "labelsTs", config=EvaluationConfig(workers=2), progress=False)
    assert json.dumps(serial.rows, default=str) == json.dumps(parallel.rows, default=str)


@pytest.mark.realmini
def test_model_mode_scores_catalog_test_cases_on_native_grid(realmini_root: Path, tmp_path: Path) -> None:
    folder = realmini_root / "Dataset502_HippocampusMR"
    model = make_model_dir(tmp_path / "model", datasets=(("HippocampusMR", "T1", ("anterior", "posterior"), folder),))
    result = evaluate_model(
        model, split="test", inference=InferenceConfig(overlap=0.0), config=EvaluationConfig(bootstrap_samples=100),
        device="cpu", overlays=True, save_predictions=tmp_path / "preds", progress=False, max_cases=2,
    )
    assert {r["task"] for r in result.rows} == {"HippocampusMR/anterior", "HippocampusMR/posterior"}
    assert len({r["case"] for r in result.rows}) == 2
    assert all(r["ref_voxels"] > 0 for r in result.rows)  # scored against the real labels
    assert len(result.overlays) == 2
    written = sorted((tmp_path / "preds" / "HippocampusMR").glob("*.nii.gz"))
    assert len(written) == 2
    write_outputs(result, tmp_path / "out", report=True)
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000
