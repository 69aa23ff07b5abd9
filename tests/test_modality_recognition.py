"""Modality recognition: `hermes evaluate --detect-modality` reports it (confusion matrix, Dice
with inferred vs given modality); `hermes predict` without flags says what it chose and how sure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import make_model_dir

from hermes.cli import main
from hermes.config import EvaluationConfig, InferenceConfig
from hermes.data.imageio import save_image
from hermes.evaluation.evaluate import evaluate_model, write_outputs
from hermes.inference.modality_guess import REPORTED_CONFIDENCE_CAP
from hermes.inference.predictor import Predictor

FAST = InferenceConfig(overlap=0.0, postprocess=False)


@pytest.fixture(scope="module")
def two_modality_model(small_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight model of a CT and a T1 dataset of the synthetic cohort."""
    ct = next(small_cohort.glob("Dataset*_AbdomenCT"))
    t1 = next(small_cohort.glob("Dataset*_BrainT1"))
    ct_labels = tuple(k for k in json.loads((ct / "dataset.json").read_text())["labels"] if k != "background")
    t1_labels = tuple(k for k in json.loads((t1 / "dataset.json").read_text())["labels"] if k != "background")
    return make_model_dir(
        tmp_path_factory.mktemp("recognition") / "model",
        datasets=(("AbdomenCT", "CT", ct_labels, ct), ("BrainT1", "T1", t1_labels, t1)),
        spacing=(6.0, 6.0, 6.0),  # a few windows per case: fast
    )


def _evaluate(model: Path, detect: bool):
    return evaluate_model(
        model, split="test", inference=FAST, config=EvaluationConfig(bootstrap_samples=20), device="cpu",
        detect_modality=detect, progress=False, max_cases=1,
    )


def test_detect_modality_reports_confusion_and_dice_given_vs_inferred(two_modality_model, monkeypatch,
                                                                        tmp_path) -> None:
    given = _evaluate(two_modality_model, detect=False)
    assert "modality_recognition" not in given.summary
    # a head that always says CT: every T1 case is a CT guess, with the probability it gave
    monkeypatch.setattr(Predictor, "modality_probabilities", lambda self, images: {"CT": 0.8, "T1": 0.2})
    result = _evaluate(two_modality_model, detect=True)
    section = result.summary["modality_recognition"]
    assert section["confusion"] == {"CT": {"CT": 1, "T1": 0}, "T1": {"CT": 1, "T1": 0}}
    assert section["per_modality"]["CT"]["accuracy"] == 1.0 and section["per_modality"]["T1"]["accuracy"] == 0.0
    assert section["accuracy"] == 0.5 and section["n_cases"] == 2
    assert section["confidence"]["max_when_wrong"] == pytest.approx(0.8)
    # the given-modality Dice is the plain (oracle) evaluation's on the same cases; the inferred
    # one is this evaluation's main table
    for dataset in ("AbdomenCT", "BrainT1"):
        dice = section["dice"][dataset]
        assert dice["given"] == pytest.approx(given.summary["datasets"][dataset]["mean"]["dice"]["mean"])
        assert dice["inferred"] == pytest.approx(result.summary["datasets"][dataset]["mean"]["dice"]["mean"])
    assert section["dice"]["AbdomenCT"]["delta"] == pytest.approx(0.0)  # right guess, same prompt modality
    table = result.table()
    assert "modality recognition: accuracy 0.500 over 2 case(s)" in table and "Dice given" in table
    write_outputs(result, tmp_path / "out", report=True)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["modality_recognition"]["confusion"]["T1"]["CT"] == 1
    assert "Modality recognition" in (tmp_path / "out" / "report.html").read_text()


# ----------------------------------------------------------------------------------------------
# hermes predict with no flag
# ----------------------------------------------------------------------------------------------
def _scan(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    array = rng.normal(-700, 60, (28, 24, 20)).astype(np.int16)
    return save_image(tmp_path / "scan.nii.gz", array, np.diag([2.0, 2.0, 2.0, 1.0]))


@pytest.fixture(scope="module")
def ct_mr_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(
        tmp_path_factory.mktemp("guess") / "model",
        datasets=(("CTSet", "CT", ("liver", "kidney"), None), ("MRSet", "T1", ("hippo",), None)),
        spacing=(4.0, 4.0, 4.0),
    )


@pytest.mark.parametrize(("raw", "shown", "capped"), [(0.999, "0.95", True), (0.8, "0.80", False)])
def test_predict_without_flags_says_what_it_chose_and_caps_the_confidence(
    ct_mr_model, tmp_path, monkeypatch, capsys, raw, shown, capped
) -> None:
    monkeypatch.setattr(Predictor, "modality_probabilities", lambda self, images: {"T1": raw, "CT": 1 - raw})
    out = tmp_path / "out.nii.gz"
    assert main(["predict", "-m", str(ct_mr_model), "-i", str(_scan(tmp_path)), "-o", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modality: ")]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith(f"modality: T1 (p={shown}") and "from the image" in line
    assert "pass --modality to override" in line and "tasks: 1 of MRSet" in line
    assert ("capped" in line) is capped
    sidecar = json.loads(out.with_name("out.json").read_text())
    assert sidecar["modality"] == "T1" and sidecar["tasks"] == ["MRSet/hippo"]
    assert sidecar["modality_probability"] == pytest.approx(min(raw, REPORTED_CONFIDENCE_CAP))
    assert sidecar["modality_probability"] < 0.99
    assert sidecar["modality_scores"]["T1"] == pytest.approx(raw, abs=1e-4)  # the raw softmax is kept


def test_modality_flag_overrides_the_guess(ct_mr_model, tmp_path, monkeypatch, capsys) -> None:
    def never(self: Predictor, images: object) -> dict[str, float]:  # a head that must not be asked
        raise AssertionError("the modality head ran although --modality was given")

    monkeypatch.setattr(Predictor, "modality_probabilities", never)
    out = tmp_path / "out.nii.gz"
    args = ["predict", "-m", str(ct_mr_model), "-i", str(_scan(tmp_path)), "-o", str(out), "--modality", "CT"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert not any(line.startswith("modality: ") for line in err.splitlines())
    sidecar = json.loads(out.with_name("out.json").read_text())
    assert sidecar["modality"] == "CT" and sidecar["modality_source"] == "given"
    assert sidecar["tasks"] == ["CTSet/liver", "CTSet/kidney"] and "modality_scores" not in sidecar


def test_model_trained_without_dropout_is_flagged(ct_mr_model, tmp_path, monkeypatch, capsys) -> None:
    model = tmp_path / "old_model"
    shutil.copytree(ct_mr_model, model)
    spec = json.loads((model / "spec.json").read_text())
    spec["training"]["config"] = {"data": {"batch_size": 2}}  # recorded by a trainer without the option
    (model / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setattr(Predictor, "modality_probabilities", lambda self, images: {"T1": 0.3, "CT": 0.7})
    assert main(["predict", "-m", str(model), "-i", str(_scan(tmp_path)), "-o", str(tmp_path / "o.nii.gz")]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("modality: "))
    assert line.startswith("modality: CT (p=0.70") and "trained without modality-prompt dropout" in line
    assert "tasks: 2 of CTSet" in line


def test_real_head_guess_is_reported_once_and_capped(ct_mr_model, tmp_path, capsys) -> None:
    predictor = Predictor(ct_mr_model, device="cpu", config=FAST)
    prediction = predictor.predict(_scan(tmp_path), progress=False, verbose=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("modality: ")]
    assert len(lines) == 1 and lines[0].startswith(f"modality: {prediction.modality} (p=")
    scores = prediction.extra["modality_scores"]
    assert max(scores, key=lambda m: scores[m]) == prediction.modality
    assert prediction.modality_probability == pytest.approx(min(scores[prediction.modality], 0.95), abs=1e-4)
