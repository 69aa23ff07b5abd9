"""Predictor, API and `hermes predict`: exact input geometry, names, errors, output layouts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from inference_helpers import make_model_dir

from hermes.cli import main
from hermes.config import InferenceConfig
from hermes.data.imageio import Image, axis_codes, load_image, save_image
from hermes.errors import ConfigError, DataError
from hermes.inference import Predictor, predict
from hermes.inference.api import discover_inputs

FAST = InferenceConfig(overlap=0.25, window_batch_size=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(
        tmp_path_factory.mktemp("model") / "model",
        datasets=(
            ("CTSet", "CT", ("liver", "kidney"), None),
            ("OtherCT", "CT", ("liver",), None),
            ("MRSet", "T1", ("hippo",), None),
        ),
    )


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor(model_dir, device="cpu", config=FAST)


def _ct(shape: tuple[int, int, int] = (30, 26, 18), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.normal(-800, 50, shape).astype(np.float32)
    array[5:-5, 4:-4, 3:-3] = rng.normal(40, 80, (shape[0] - 10, shape[1] - 8, shape[2] - 6))
    return array


RAS = np.diag([1.5, 1.2, 2.5, 1.0])
RAS[:3, 3] = (-20.0, 10.0, 5.0)
# LPS-like, permuted, oblique: axes (y, -z, -x) with a small rotation.
_theta = np.deg2rad(7)
_rot = np.array([[np.cos(_theta), -np.sin(_theta), 0], [np.sin(_theta), np.cos(_theta), 0], [0, 0, 1]])
NON_RAS = np.eye(4)
NON_RAS[:3, :3] = _rot @ np.array([[0, 0, -1.1], [1.4, 0, 0], [0, -2.2, 0]])
NON_RAS[:3, 3] = (30.0, -12.0, 40.0)


@pytest.mark.parametrize("affine", [RAS, NON_RAS], ids=["RAS", "non-RAS"])
def test_output_has_the_input_geometry(predictor: Predictor, tmp_path: Path, affine: np.ndarray) -> None:
    array = _ct()
    path = save_image(tmp_path / "ct.nii.gz", array.astype(np.int16), affine)
    prediction = predictor.predict(path, modality="CT", progress=False)
    assert prediction.labels is not None
    assert prediction.labels.shape == array.shape
    assert np.array_equal(prediction.affine, load_image(path).affine)
    out = tmp_path / "seg.nii.gz"
    prediction.save(out)
    written = nib.load(str(out))
    assert written.shape == array.shape
    assert np.allclose(written.affine, load_image(path).affine, atol=1e-6)
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["labels"] == {"background": 0, "CTSet/liver": 1, "CTSet/kidney": 2, "OtherCT/liver": 3}
    assert set(np.unique(prediction.labels)) <= {0, 1, 2, 3}


def test_non_ras_prediction_is_the_ras_prediction_reoriented(predictor: Predictor) -> None:
    """Reorienting an image must not change what is segmented, only how it is stored."""
    array = _ct((28, 24, 20), seed=3)
    ras = predictor.predict(Image(array, RAS.copy()), modality="CT", tasks=["kidney"], progress=False)
    flipped_affine = RAS.copy()
    flipped_affine[:3, 0] *= -1
    flipped_affine[:3, 3] += RAS[:3, 0] * (array.shape[0] - 1)
    flipped = predictor.predict(Image(array[::-1].copy(), flipped_affine), modality="CT", tasks=["kidney"],
                                progress=False)
    assert np.array_equal(flipped.labels[::-1], ras.labels)  # type: ignore[index]


def test_multilabel_is_the_most_probable_of_the_binary_masks(predictor: Predictor) -> None:
    image = Image(_ct(seed=1), RAS.copy())
    multi = predictor.predict(image, modality="CT", progress=False)
    binary = Predictor(predictor.model_dir, device="cpu", config=FAST.model_copy(update={"output": "binary"}))
    masks = binary.predict(image, modality="CT", progress=False).masks
    assert masks is not None and multi.labels is not None
    union = np.zeros(multi.labels.shape, dtype=bool)
    for index, task in enumerate(multi.tasks, start=1):
        assert not np.any((multi.labels == index) & ~masks[task])  # a label implies its own mask
        union |= masks[task]
    assert np.array_equal(multi.labels > 0, union)  # every voxel above threshold gets some label


def test_task_names_short_forms_and_errors(predictor: Predictor) -> None:
    assert predictor.resolve_tasks(["kidney"]) == [1]
    assert predictor.resolve_tasks(["CTSet/liver", "otherct/LIVER"]) == [0, 2]
    assert predictor.resolve_tasks(["Dataset900_CTSet/liver"]) == [0]
    with pytest.raises(ConfigError, match=r"ambiguous.*CTSet/liver.*OtherCT/liver"):
        predictor.resolve_tasks(["liver"])
    with pytest.raises(ConfigError, match="unknown task 'spleen'; valid tasks: CTSet/liver"):
        predictor.resolve_tasks(["spleen"])
    with pytest.raises(ConfigError, match="unknown modality 'XRAY'; this model knows: CT, T1"):
        predictor.resolve_modality("XRAY")
    with pytest.raises(ConfigError, match="not trained on modality 'PET'"):
        predictor.resolve_modality("pet")
    assert predictor.default_tasks("T1") == [3]
    groups = predictor.prompt_groups([0, 2, 1], "CT")
    # Each dataset is prompted with its full task list (the paper's context), keeping only requested tasks.
    assert [(g.dataset, g.prompt, g.keep) for g in groups] == [("CTSet", (0, 1), (0, 1)), ("OtherCT", (2,), (2,))]


def test_modality_head_decides_and_is_reported(predictor: Predictor) -> None:
    prediction = predictor.predict(Image(_ct(), RAS.copy()), progress=False)
    assert prediction.modality in {"CT", "T1"} and prediction.modality_source == "predicted"
    assert prediction.modality_probability is not None and 0.0 < prediction.modality_probability <= 1.0
    assert prediction.tasks == [predictor.catalog.tasks[t].name for t in predictor.default_tasks(prediction.modality)]


def test_cli_single_file_overwrite_and_corrupt_input(model_dir: Path, tmp_path: Path, capsys) -> None:
    image = save_image(tmp_path / "case_0000.nii.gz", _ct().astype(np.int16), NON_RAS)
    out = tmp_path / "out" / "seg.nii.gz"
    args = ["predict", "-m", str(model_dir), "-i", str(image), "-o", str(out), "--modality", "CT",
            "--tasks", "CTSet/kidney", "--quiet", "--overlap", "0.25"]
    assert main(args) == 0
    assert nib.load(str(out)).shape == (30, 26, 18)
    assert json.loads((tmp_path / "out" / "seg.json").read_text())["tasks"] == ["CTSet/kidney"]
    assert main(args) == 2  # exists, no --overwrite
    assert "output exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    corrupt = tmp_path / "bad.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage")
    assert main(["predict", "-m", str(model_dir), "-i", str(corrupt), "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert str(corrupt) in capsys.readouterr().err
    assert main(["predict", "-m", str(model_dir), "-i", str(image), "-o", str(tmp_path / "y.nii.gz"),
                 "--tasks", "nope"]) == 2
    assert "valid tasks" in capsys.readouterr().err


def test_cli_folder_of_cases_binary_and_multilabel(model_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "imagesTs"
    for case, seed in (("a", 0), ("b", 1)):
        save_image(images / f"{case}_0000.nii.gz", _ct((24, 22, 16), seed).astype(np.int16), RAS)
    cases, folder = discover_inputs(images)
    assert folder and [c.case_id for c in cases] == ["a", "b"]
    common = ["-m", str(model_dir), "-i", str(images), "--modality", "CT", "--quiet", "--overlap", "0.25"]
    assert main(["predict", *common, "-o", str(tmp_path / "multi")]) == 0
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == ["a.json", "a.nii.gz", "b.json", "b.nii.gz",
                                                                     "dataset.json"]
    assert main(["predict", *common, "-o", str(tmp_path / "bin"), "--output", "binary", "--tasks", "kidney",
                 "OtherCT/liver"]) == 0
    files = sorted(p.name for p in (tmp_path / "bin" / "a").iterdir())
    assert files == ["CTSet__kidney.nii.gz", "OtherCT__liver.nii.gz", "labels.json"]
    mask = load_image(tmp_path / "bin" / "a" / "CTSet__kidney.nii.gz")
    assert mask.array.shape == (24, 22, 16) and set(np.unique(mask.array)) <= {0, 1}


def test_api_predict_returns_arrays_and_metadata(model_dir: Path) -> None:
    result = predict(model_dir, Image(_ct(), RAS.copy()), tasks=["kidney"], modality="ct", device="cpu",
                     config=FAST, progress=False)
    assert result.label_map() == {"background": 0, "CTSet/kidney": 1}
    meta = result.metadata()
    assert meta["modality"] == "CT" and meta["modality_source"] == "given" and "most probable" in meta["overlap_rule"]
    with pytest.raises(DataError, match="input not found"):
        discover_inputs("/nonexistent/image.nii.gz")


@pytest.mark.slow
@pytest.mark.realmini
def test_realmini_case_and_dicom_series_geometry(realmini_root: Path, tmp_path: Path) -> None:
    # Coarse 8 mm model spacing: geometry is what is tested, not segmentation quality.
    model = make_model_dir(tmp_path / "model", spacing=(8.0, 8.0, 8.0))
    predictor = Predictor(model, device="cpu", config=InferenceConfig(overlap=0.0, window_batch_size=4))
    # An LPS NIfTI case (BraTS) and the DICOM series (LPS, rows flipped vs its NIfTI label).
    case = next((realmini_root / "Dataset504_BrainTumourMR" / "imagesTs").glob("*_0000.nii.gz"))
    dicom = realmini_root / "dicom_ct_example" / "dicom"
    for source, modality in ((case, "T1"), (dicom, "CT")):
        original = load_image(source)
        assert axis_codes(original.affine) == "LPS"
        prediction = predictor.predict(source, modality=modality, progress=False)
        assert prediction.labels is not None and prediction.labels.shape == original.array.shape
        assert np.array_equal(prediction.affine, original.affine)
        out = tmp_path / f"{source.name}_seg.nii.gz"
        prediction.save(out)
        written = load_image(out)
        assert written.array.shape == original.array.shape
        assert np.allclose(written.affine, original.affine, atol=1e-4)
    # The series and its NIfTI label (dcm2niix grid) describe the same voxels in world space.
    label = load_image(realmini_root / "dicom_ct_example" / "label.nii.gz")
    series = load_image(dicom)
    corners = np.array([[0, 0, 0, 1], [*(np.array(series.array.shape) - 1), 1]], dtype=float).T
    world = series.affine @ corners
    label_corners = np.linalg.inv(label.affine) @ world
    assert np.allclose(np.sort(label_corners[:3], axis=1), np.sort(corners[:3], axis=1), atol=1e-2)


def test_adaptation_layout_and_traditional_baseline(tmp_path: Path) -> None:
    """A bundle with a serialised catalog and no catalog summary (adaptation output) loads the
    same way; a per-dataset baseline predicts its own tasks and needs no modality."""
    adapted = make_model_dir(tmp_path / "adapted", layout="adaptation")
    predictor = Predictor(adapted, device="cpu", config=FAST)
    assert predictor.task_names == ["CTSet/liver", "CTSet/kidney", "MRSet/hippo"]
    assert predictor.trained_modalities == ["CT", "T1"]
    baseline = make_model_dir(tmp_path / "baseline", datasets=(("CTSet", "CT", ("liver", "kidney"), None),),
                              architecture="resunet")
    result = Predictor(baseline, device="cpu", config=FAST).predict(Image(_ct(), RAS.copy()), progress=False)
    assert result.modality_source == "the model's only modality"
    assert result.tasks == ["CTSet/liver", "CTSet/kidney"] and result.labels.shape == _ct().shape  # type: ignore[union-attr]


def test_oracle_dataset_prompt(predictor: Predictor) -> None:
    groups = predictor.prompt_groups([2], "CT", dataset="OtherCT")
    assert [(g.dataset, g.prompt, g.keep) for g in groups] == [("OtherCT", (2,), (2,))]
    with pytest.raises(ConfigError, match="not tasks of dataset 'OtherCT'"):
        predictor.prompt_groups([0], "CT", dataset="OtherCT")
    result = predictor.predict(Image(_ct(), RAS.copy()), dataset="CTSet", progress=False)
    assert result.tasks == ["CTSet/liver", "CTSet/kidney"] and result.modality == "CT"
