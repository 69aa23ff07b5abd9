"""Per-task largest-component postprocessing: the decision rule, its storage, prediction applying it.

The network is a deterministic fake that segments by intensity: the "organ" task is tissue
around 400 HU, the "lesion" task tissue around 900 HU. The case has one organ with a stray
bright island that the reference does not label (LCC helps) and two separate lesions that the
reference labels both (LCC hurts).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cc3d
import numpy as np
import pytest
import torch
from inference_helpers import make_model_dir

from hermes.bundle import ModelBundle
from hermes.cli import main
from hermes.config import InferenceConfig
from hermes.data.imageio import load_image, save_image
from hermes.errors import DataError
from hermes.inference import Predictor
from hermes.inference import predictor as predictor_module
from hermes.inference.api import predict_files
from hermes.inference.postprocess import (
    Chooser,
    Postprocessing,
    decide,
    largest_component,
    load_postprocessing,
    save_postprocessing,
)

FAST = InferenceConfig(overlap=0.25, window_batch_size=4)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
ORGAN, LESION = "PPSet/organ", "PPSet/lesion"


class IntensityFake(torch.nn.Module):
    modality_head = None

    def forward(self, image, task_ids, modality_id, task_mask=None, output_tasks=None):  # type: ignore[no-untyped-def]
        x = image[:, 0]  # CT normalised with mean 40, std 300: 400 HU -> 1.2, 900 HU -> 2.9
        roles = {0: (x > 0.8) & (x < 2.0), 1: x > 2.0}
        logits = torch.where(torch.stack([roles[int(t)] for t in task_ids[0]], dim=1), 4.0, -10.0)
        if output_tasks is not None:
            logits = logits[:, list(output_tasks)]
        return SimpleNamespace(logits=logits, modality_logits=None, deep_supervision=[])


def _case() -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((24, 24, 24), np.float32)
    label = np.zeros((24, 24, 24), np.uint8)
    image[4:12, 4:12, 4:12] = 400.0  # the organ
    label[4:12, 4:12, 4:12] = 1
    image[18:20, 18:20, 18:20] = 400.0  # an island the organ's reference does not have
    image[15:18, 3:6, 15:18] = 900.0  # two lesions, both in the reference
    image[3:6, 17:20, 17:20] = 900.0
    label[15:18, 3:6, 15:18] = 2
    label[3:6, 17:20, 17:20] = 2
    return image, label


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model trained (so its spec says) on one dataset with two cases, one held out."""
    folder = tmp_path / "Dataset950_PPSet"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": 2, "file_ending": ".nii.gz",
    }))
    image, label = _case()
    for case in ("case_a", "case_b"):
        save_image(folder / "imagesTr" / f"{case}_0000.nii.gz", image.astype(np.int16), AFFINE)
        save_image(folder / "labelsTr" / f"{case}.nii.gz", label, AFFINE)
    directory = make_model_dir(tmp_path / "model", datasets=(("PPSet", "CT", ("organ", "lesion"), folder),))
    spec = json.loads((directory / "spec.json").read_text())
    spec["training"]["validation_cases"] = {"PPSet": ["case_b"]}
    (directory / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setattr(predictor_module, "load_model", lambda d, device=None: (IntensityFake(), ModelBundle.load(d)))
    return directory


def test_largest_component_and_the_decision_rule() -> None:
    image, ref = _case()
    organ_pred = image == 400.0
    lesion_pred = image == 900.0
    assert cc3d.connected_components(organ_pred).max() == 2
    np.testing.assert_array_equal(largest_component(organ_pred), ref == 1)
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()

    chooser = Chooser()
    chooser("PPSet", "case", [(ORGAN, organ_pred, ref == 1), (LESION, lesion_pred, ref == 2)])
    plan = chooser.decide()
    assert plan.largest_component == (ORGAN,)  # kept where it helps, not where it hurts
    assert plan.decisions[ORGAN]["dice_with"] == 1.0 > plan.decisions[ORGAN]["dice_without"]
    assert plan.decisions[LESION]["dice_with"] < plan.decisions[LESION]["dice_without"] == 1.0
    # equal means are not an improvement; cases with both masks empty (NaN) are left out
    assert decide({"t": [(0.8, 0.8), (float("nan"), float("nan"))]}).largest_component == ()
    assert decide({"t": [(0.5, 0.9), (float("nan"), float("nan"))]}).decisions["t"]["cases"] == 1


def test_store_load_and_refuse_to_overwrite(tmp_path: Path) -> None:
    plan = Postprocessing((ORGAN,), {ORGAN: {"keep": True}})
    path = save_postprocessing(tmp_path, plan)
    assert load_postprocessing(tmp_path, [ORGAN, LESION]).largest_component == (ORGAN,)  # type: ignore[union-attr]
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        save_postprocessing(tmp_path, plan)
    path.write_text(json.dumps({"largest_component": ["Nope/x"]}))
    with pytest.raises(Exception, match="unknown task"):
        load_postprocessing(tmp_path, [ORGAN])
    assert load_postprocessing(tmp_path / "none") is None


def test_choose_on_validation_then_predict_applies_it(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["evaluate", "-m", str(model), "--choose-postprocessing", "--workers", "1", "--bootstrap", "10", "--quiet"])
    out = capsys.readouterr().out
    stored = json.loads((model / "postprocessing.json").read_text())
    assert stored["largest_component"] == [ORGAN]
    assert stored["decisions"][LESION]["keep"] is False and stored["decisions"][ORGAN]["cases"] == 1
    assert stored["source"]["split"] == "val" and "postprocessing: largest component for 1 task(s)" in out
    summary = json.loads((model / "evaluation_val" / "summary.json").read_text())
    assert summary["datasets"]["PPSet"]["tasks"][ORGAN]["dice"]["mean"] < 1.0  # scored raw

    # asking again needs --overwrite; deciding on the test split is refused
    assert main(["evaluate", "-m", str(model), "--choose-postprocessing", "--quiet"]) != 0
    assert main(["evaluate", "-m", str(model), "--choose-postprocessing", "--split", "test", "--overwrite"]) != 0
    assert "validation cases" in capsys.readouterr().err

    image, ref = _case()
    source = save_image(tmp_path / "in" / "case_0000.nii.gz", image.astype(np.int16), AFFINE)
    predict_files(model, source.parent, tmp_path / "pp", config=FAST, progress=False, verbose=False)
    predict_files(model, source.parent, tmp_path / "raw", config=FAST.model_copy(update={"postprocess": False}),
                  progress=False, verbose=False)
    pp = np.asarray(load_image(tmp_path / "pp" / "case.nii.gz").array)
    raw = np.asarray(load_image(tmp_path / "raw" / "case.nii.gz").array)
    np.testing.assert_array_equal(pp, ref)  # the island is gone, both lesions stay
    assert (raw == 1).sum() == (ref == 1).sum() + 8 and ((raw == 2) == (ref == 2)).all()
    sidecar = json.loads((tmp_path / "pp" / "case.json").read_text())
    assert sidecar["postprocessing"] == {"largest_component": [ORGAN]}

    binary = Predictor(model, device="cpu", config=FAST).predict(source, output="binary", progress=False)
    assert binary.masks is not None
    np.testing.assert_array_equal(binary.masks[ORGAN], ref == 1)
    np.testing.assert_array_equal(binary.masks[LESION], ref == 2)


def test_cli_no_postprocess_flag(model: Path, tmp_path: Path) -> None:
    save_postprocessing(model, Postprocessing((ORGAN,)))
    image, ref = _case()
    source = save_image(tmp_path / "case_0000.nii.gz", image.astype(np.int16), AFFINE)
    assert main(["predict", "-m", str(model), "-i", str(source), "-o", str(tmp_path / "a.nii.gz"), "--quiet",
                 "--device", "cpu"]) == 0
    assert main(["predict", "-m", str(model), "-i", str(source), "-o", str(tmp_path / "b.nii.gz"), "--quiet",
                 "--device", "cpu", "--no-postprocess"]) == 0
    with_pp = np.asarray(load_image(tmp_path / "a.nii.gz").array)
    without = np.asarray(load_image(tmp_path / "b.nii.gz").array)
    assert (with_pp == 1).sum() == (ref == 1).sum() and (without == 1).sum() == (ref == 1).sum() + 8
