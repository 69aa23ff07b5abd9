"""Modality recognition: `hermes evaluate --detect-modality` reports it (confusion matrix, Dice
with inferred vs given modality); `hermes predict` without flags says what it chose and how sure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from inference_helpers import make_model_dir

from hermes.config import EvaluationConfig, InferenceConfig
from hermes.evaluation.evaluate import evaluate_model, write_outputs
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
