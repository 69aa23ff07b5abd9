"""Fuzz/regression suite of bad inputs: each ends in a clear error or a correct result.

Every case runs the ``hermes`` command in-process on tiny generated inputs and asserts (a) the
exit code, (b) that the message names the offending file or argument, and (c) that no file that
existed before the run changed (every file under the test folder hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import make_model_dir

from hermes.cli import main
from hermes.data.imageio import load_image, save_image
from hermes.errors import DataError

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden temp files included)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_unchanged(before: dict[str, str], root: Path) -> None:
    after = snapshot(root)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"pre-existing files changed or removed: {changed}"


def fails(root: Path, argv: Sequence[str], capsys: pytest.CaptureFixture[str], *names: str) -> str:
    """Run ``hermes argv``; assert a non-zero exit, every ``name`` in stderr, no file changed."""
    capsys.readouterr()
    before = snapshot(root)
    code = None
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"exit {code} for {argv}: {err}"
    assert "Traceback" not in err
    for name in names:
        assert str(name) in err, f"{name!r} not in: {err}"
    assert_unchanged(before, root)
    return err


def ct_volume(shape: tuple[int, int, int] = (20, 18, 12), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.normal(-800, 50, shape)
    array[4:-4, 4:-4, 2:-2] = rng.normal(40, 80, (shape[0] - 8, shape[1] - 8, shape[2] - 4))
    return array.astype(np.int16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights, one CT dataset (two tasks) and one MR dataset: enough for error paths."""
    return make_model_dir(
        tmp_path_factory.mktemp("model") / "model",
        datasets=(("CTSet", "CT", ("liver", "kidney"), None), ("MRSet", "T1", ("hippo",), None)),
    )


def predict_args(model: Path, image: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "-m", str(model), "-i", str(image), "-o", str(out), "--modality", "CT", "--quiet",
            "--overlap", "0", "--device", "cpu", *extra]


# ----------------------------------------------------------------------------------------------
# DICOM series
# ----------------------------------------------------------------------------------------------
def write_series(folder: Path, slices: int = 8, gap: float = 2.5, rows: int = 20, cols: int = 18,
                 positions: Sequence[float] | None = None) -> list[Path]:
    """A tiny uncompressed CT series (pydicom), one file per slice, files named by instance."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(entropy_srcs=[str(folder), "s"]), generate_uid(entropy_srcs=[str(folder)])
    positions = list(positions) if positions is not None else [10.0 + gap * k for k in range(slices)]
    volume = ct_volume((cols, rows, len(positions)))
    paths = []
    for k, z in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(folder), str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice{k:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.Modality, ds.InstanceNumber = "CT", k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-20.0, -15.0, z]
        ds.PixelSpacing = [1.5, 1.25]  # row spacing, column spacing
        ds.SliceThickness = gap
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).tobytes()  # (rows, cols)
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def test_regular_series_geometry_matches_the_check(tmp_path: Path) -> None:
    from hermes.data.dicom import check_series, resample_irregular

    files = write_series(tmp_path / "series", slices=6, gap=2.5)
    image = load_image(tmp_path / "series")
    assert image.array.shape == (18, 20, 6)
    assert image.spacing == pytest.approx((1.25, 1.5, 2.5))
    geometry = check_series(tmp_path / "series")
    assert geometry.regular and geometry.files == tuple(files)
    # On a regular series the resampler is the identity and places the slices where ITK does.
    array, affine_lps = resample_irregular(image.array, geometry)
    np.testing.assert_array_equal(array, image.array.astype(np.float32))
    np.testing.assert_allclose(np.diag([-1.0, -1, 1, 1]) @ affine_lps, image.affine, atol=1e-6)


def test_dicom_missing_slice_refused_then_resampled_on_request(model_dir: Path, tmp_path: Path, capsys) -> None:
    files = write_series(tmp_path / "series", slices=8, gap=2.5)
    full = load_image(tmp_path / "series")
    files[3].unlink()
    # GDCM alone would give 7 slices at 17.5/6 = 2.917 mm: every position after the gap wrong.
    err = fails(tmp_path, predict_args(model_dir, tmp_path / "series", tmp_path / "seg.nii.gz"), capsys,
                files[4], "irregular DICOM series", "--allow-irregular")
    assert "slice gap of 5.000 mm" in err and "2.500 mm" in err
    assert not (tmp_path / "seg.nii.gz").exists()
    with pytest.warns(UserWarning, match="resampled"):
        resampled = load_image(tmp_path / "series", allow_irregular=True)
    assert resampled.array.shape == full.array.shape
    np.testing.assert_allclose(resampled.affine, full.affine, atol=1e-6)
    truth = full.array.astype(np.float32)
    np.testing.assert_array_equal(resampled.array[..., [0, 1, 2, 4, 5, 6, 7]], truth[..., [0, 1, 2, 4, 5, 6, 7]])
    np.testing.assert_allclose(resampled.array[..., 3], (truth[..., 2] + truth[..., 4]) / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(predict_args(model_dir, tmp_path / "series", tmp_path / "seg.nii.gz", "--allow-irregular"))
    assert code == 0
    assert load_image(tmp_path / "seg.nii.gz").array.shape == (18, 20, 8)


def test_dicom_uneven_gaps_resampled_by_position(tmp_path: Path) -> None:
    """Positions 0, 2, 4, 7, 9 (median gap 2): 5 slices over 9 mm -> 5 slices at 2.25 mm."""
    write_series(tmp_path / "s", positions=[0.0, 2.0, 4.0, 7.0, 9.0])
    with pytest.raises(DataError, match=r"slice003\.dcm: slice gap of 3\.000 mm"):
        load_image(tmp_path / "s")
    with pytest.warns(UserWarning):
        image = load_image(tmp_path / "s", allow_irregular=True)
    assert image.spacing[2] == pytest.approx(2.25)
    assert image.affine[2, 3] == pytest.approx(0.0)
    import pydicom

    raw = [pydicom.dcmread(str(tmp_path / "s" / f"slice{k:03d}.dcm")).pixel_array.T.astype(np.float32)
           for k in range(5)]
    # z = 6.75 mm lies between the slices at 4 and 7 mm, 11/12 of the way to the upper one.
    np.testing.assert_allclose(image.array[..., 3], raw[2] / 12 + raw[3] * 11 / 12, rtol=1e-5)
    np.testing.assert_allclose(image.array[..., 1], raw[1] * 0.875 + raw[2] * 0.125, rtol=1e-5)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("random", "not a DICOM file"),
        ("empty", "not a DICOM file"),
        ("truncated", "truncated"),
        ("header_only", "truncated"),
        ("text", "not a DICOM file"),
        ("duplicate", "duplicate slices"),
        ("orientation", "ImageOrientationPatient"),
        ("matrix", "pixels, but"),
        ("spacing", "PixelSpacing"),
    ],
)
def test_damaged_dicom_series_is_refused(model_dir: Path, tmp_path: Path, capsys, damage: str,
                                         message: str) -> None:
    import pydicom

    folder = tmp_path / "my series"
    files = write_series(folder, slices=6)
    victim = files[2]
    if damage == "random":
        victim.write_bytes(np.random.default_rng(0).integers(0, 256, victim.stat().st_size, np.uint8).tobytes())
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "header_only":
        victim.write_bytes(victim.read_bytes()[:300])
    elif damage == "text":
        victim = folder / "notes.txt"
        victim.write_text("series notes")
    elif damage == "duplicate":
        victim = folder / "slice999.dcm"
        shutil.copy(files[2], victim)
    else:
        ds = pydicom.dcmread(str(victim))
        if damage == "orientation":
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
        elif damage == "matrix":
            ds.Rows = 10
            ds.PixelData = ds.PixelData[: 10 * ds.Columns * 2]
        else:
            ds.PixelSpacing = [1.0, 1.0]
        ds.save_as(str(victim))
    for extra in ((), ("--allow-irregular",)):  # integrity problems are never resampled away
        err = fails(tmp_path, predict_args(model_dir, folder, tmp_path / "seg.nii.gz", *extra), capsys, victim)
        assert message in err
    assert not (tmp_path / "seg.nii.gz").exists()


def test_dicomdir_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    write_series(tmp_path / "s", slices=4)
    (tmp_path / "s" / "DICOMDIR").write_bytes(b"media index")
    (tmp_path / "s" / ".DS_Store").write_bytes(b"finder")
    assert load_image(tmp_path / "s").array.shape == (18, 20, 4)


@pytest.mark.realmini
def test_realmini_series_with_a_missing_slice(realmini_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    shutil.copytree(realmini_root / "dicom_ct_example" / "dicom", folder)
    victim = sorted(folder.iterdir())[9]
    victim.unlink()
    with pytest.raises(DataError, match=r"slice gap of 4\.000 mm") as info:
        load_image(folder)
    assert "1 missing slice" in str(info.value)
    with pytest.warns(UserWarning):
        image = load_image(folder, allow_irregular=True)
    assert image.array.shape == (512, 512, 20)
    assert image.spacing == pytest.approx((0.9766, 0.9766, 2.0), abs=1e-3)


# ----------------------------------------------------------------------------------------------
# Outputs are never replaced without --overwrite; label maps per case
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images Ts ü"  # spaces and unicode in every path
    for case, seed in (("a", 0), ("b", 1)):
        save_image(folder / f"{case}_0000.nii.gz", ct_volume(seed=seed), AFFINE)
    return folder


def test_predict_keeps_a_foreign_dataset_json(model_dir: Path, images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = {"name": "my dataset", "labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}
    (out / "dataset.json").write_text(json.dumps(mine))
    err = fails(tmp_path, predict_args(model_dir, images, out, "--tasks", "CTSet/kidney"), capsys,
                out / "dataset.json", "--overwrite")
    assert "left unchanged" in err
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"]  # stopped before writing a case
    assert main(predict_args(model_dir, images, out, "--tasks", "CTSet/kidney", "--overwrite")) == 0
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "CTSet/kidney": 1}


def test_predict_into_a_folder_of_earlier_predictions(model_dir: Path, images: Path, tmp_path: Path,
                                                      capsys) -> None:
    out = tmp_path / "out"
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(images / "a_0000.nii.gz", first / "a_0000.nii.gz")
    assert main(predict_args(model_dir, first, out, "--tasks", "liver", "kidney")) == 0
    assert json.loads((out / "a.json").read_text())["labels"] == {"background": 0, "CTSet/liver": 1,
                                                                  "CTSet/kidney": 2}
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(images / "b_0000.nii.gz", second / "b_0000.nii.gz")
    # Same tasks, same map: dataset.json stays as it is and b is added.
    assert main(predict_args(model_dir, second, out, "--tasks", "liver", "kidney")) == 0
    # Swapped task order: the folder's dataset.json would be wrong for a; refused.
    (out / "b.nii.gz").unlink()
    (out / "b.json").unlink()
    fails(tmp_path, predict_args(model_dir, second, out, "--tasks", "kidney", "liver"), capsys, out / "dataset.json")
    assert not (out / "b.nii.gz").exists()
    # A stray sidecar counts as an output too.
    (out / "b.json").write_text("{}")
    fails(tmp_path, predict_args(model_dir, second, out, "--tasks", "liver", "kidney"), capsys, out / "b.json")


def write_reference(root: Path, ref_values: Sequence[int] = (1, 2)) -> tuple[Path, Path]:
    """Dataset101_Toy with labelsTs/c1 holding ``ref_values`` (dataset.json: liver 1, spleen 2)."""
    dataset = root / "Dataset101_Toy"
    (dataset / "labelsTs").mkdir(parents=True)
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 0, "file_ending": ".nii.gz"}))
    label = np.zeros((12, 10, 8), np.int16 if min(ref_values) < 0 else np.uint8)
    for k, value in enumerate(ref_values):
        label[2 + 4 * k : 5 + 4 * k, 2:8, 2:6] = value
    save_image(dataset / "labelsTs" / "c1.nii.gz", label, AFFINE)
    return dataset, dataset / "labelsTs" / "c1.nii.gz"


def test_evaluate_uses_each_case_label_map(tmp_path: Path) -> None:
    _, ref = write_reference(tmp_path)
    pred = tmp_path / "pred"
    label = load_image(ref).array
    swapped = np.where(label == 1, 2, np.where(label == 2, 1, 0)).astype(np.uint8)
    save_image(pred / "c1.nii.gz", swapped, AFFINE)
    (pred / "c1.json").write_text(json.dumps({"labels": {"background": 0, "Toy/spleen": 1, "Toy/liver": 2}}))
    # A stale folder-level map (another run's task order): the case's own map wins.
    (pred / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Toy/liver": 1, "Toy/spleen": 2}}))
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref.parent), "--quiet", "--workers", "1",
                 "--bootstrap", "10"]) == 0
    summary = json.loads((pred / "evaluation" / "summary.json").read_text())
    tasks = summary["datasets"]["Dataset101_Toy"]["tasks"]
    assert tasks["liver"]["dice"]["mean"] == 1.0 and tasks["spleen"]["dice"]["mean"] == 1.0


def test_evaluate_refuses_to_replace_results(tmp_path: Path, capsys) -> None:
    _, ref = write_reference(tmp_path)
    pred = tmp_path / "pred"
    save_image(pred / "c1.nii.gz", load_image(ref).array, AFFINE)
    args = ["evaluate", "--pred", str(pred), "--ref", str(ref.parent), "-o", str(tmp_path / "res"), "--quiet",
            "--workers", "1", "--bootstrap", "10"]
    assert main(args) == 0
    fails(tmp_path, args, capsys, tmp_path / "res", "--overwrite", "metrics.csv")
    before = (tmp_path / "res" / "summary.json").stat().st_mtime_ns
    assert main([*args, "--overwrite"]) == 0
    assert (tmp_path / "res" / "summary.json").stat().st_mtime_ns != before


@pytest.mark.parametrize(
    "where, values, bad",
    [("ref", (1, 3), "3"), ("pred", (1, 7), "7"), ("pred", (1, -1), "-1"), ("ref", (-2, 1), "-2")],
)
def test_evaluate_refuses_undeclared_label_values(tmp_path: Path, capsys, where: str, values: tuple[int, ...],
                                                  bad: str) -> None:
    _, ref = write_reference(tmp_path, values if where == "ref" else (1, 2))
    pred = tmp_path / "pred"
    pred_array = load_image(ref).array.astype(np.int16)
    if where == "pred":
        pred_array = np.zeros_like(pred_array)
        pred_array[2:5, 2:8, 2:6], pred_array[6:9, 2:8, 2:6] = values
    save_image(pred / "c1.nii.gz", pred_array, AFFINE)
    args = ["evaluate", "--pred", str(pred), "--ref", str(ref.parent), "--quiet", "--workers", "1",
            "--bootstrap", "10"]
    offending = ref if where == "ref" else pred / "c1.nii.gz"
    err = fails(tmp_path, args, capsys, offending, f"label value(s) {bad} not declared", "--ignore-undeclared")
    assert ("dataset.json" in err) if where == "ref" else ("reference's label map" in err)
    assert main([*args, "--ignore-undeclared"]) == 0


# ----------------------------------------------------------------------------------------------
# Numeric arguments: checked at parse time, ranges in --help
# ----------------------------------------------------------------------------------------------
def test_every_numeric_option_is_range_checked() -> None:
    """No subcommand takes a bare int/float: each numeric option has a hermes.cli.args range."""
    import argparse

    from hermes.cli import COMMANDS, build_parser
    from hermes.cli.args import NumberRange

    checked = 0
    for name in COMMANDS:
        parser = build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for action in sub.choices[name]._actions:
            assert action.type not in (int, float), f"hermes {name} {action.option_strings}: bare {action.type}"
            if isinstance(action.type, NumberRange):
                checked += 1
                assert str(action.type) in (action.help or ""), f"{name} {action.option_strings}: range not in help"
    assert checked >= 25


@pytest.mark.parametrize(
    "argv, option",
    [
        (["predict", "--threshold", "1.5"], "--threshold"),
        (["predict", "--threshold", "0"], "--threshold"),
        (["predict", "--threshold", "nan"], "--threshold"),
        (["predict", "--overlap", "1.0"], "--overlap"),
        (["predict", "--overlap", "-0.5"], "--overlap"),
        (["predict", "--window-batch-size", "0"], "--window-batch-size"),
        (["predict", "--window-batch-size", "2.5"], "--window-batch-size"),
        (["evaluate", "--workers", "0"], "--workers"),
        (["evaluate", "--bootstrap", "-1"], "--bootstrap"),
        (["evaluate", "--nsd-tolerance", "0"], "--nsd-tolerance"),
        (["evaluate", "--overlap", "1"], "--overlap"),
        (["evaluate", "--max-cases", "0"], "--max-cases"),
        (["cohort", "--scale", "0"], "--scale"),
        (["cohort", "--cases", "0"], "--cases"),
        (["cohort", "--test-cases", "-1"], "--test-cases"),
        (["cohort", "--seed", "-3"], "--seed"),
        (["train", "cfg.yaml", "--steps", "0"], "--steps"),
        (["train", "cfg.yaml", "--extend-steps", "-5"], "--extend-steps"),
        (["prepare", "catalog.yaml", "--workers", "0"], "--workers"),
        (["demo", "--steps", "0"], "--steps"),
        (["finetune", "--lr=-1e-3"], "--lr"),
        (["finetune", "--lr", "0"], "--lr"),
        (["finetune", "--batch-size", "0"], "--batch-size"),
        (["extend", "--distill-weight", "-1"], "--distill-weight"),
        (["extend", "--rehearsal-cases", "-1"], "--rehearsal-cases"),
        (["priors", "--cases", "0"], "--cases"),
    ],
)
def test_bad_numbers_stop_at_parse_time(tmp_path: Path, capsys, argv: list[str], option: str) -> None:
    (tmp_path / "keep.txt").write_text("x")
    err = fails(tmp_path, argv, capsys, option)
    assert "out of range" in err or "is not" in err


# ----------------------------------------------------------------------------------------------
# Cohort and catalog outputs
# ----------------------------------------------------------------------------------------------
def test_cohort_refuses_to_replace_another_seed(tmp_path: Path, capsys) -> None:
    out = tmp_path / "co hort"
    args = ["cohort", "--out", str(out), "--scale", "0.25", "--datasets", "106", "--cases", "1", "--test-cases", "0",
            "--quiet"]
    assert main([*args, "--seed", "3"]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert main([*args, "--seed", "3"]) == 0  # same parameters: reused, nothing rewritten
    err = fails(tmp_path, [*args, "--seed", "4"], capsys, folder, "seed 3 -> 4", "--overwrite")
    assert "other parameters" in err
    assert main([*args, "--seed", "4", "--overwrite"]) == 0
    assert json.loads((folder / "dataset.json").read_text())["hermes_synthetic"]["seed"] == 4


def test_catalog_init_output_paths_relative_to_the_file(tmp_path: Path, capsys, monkeypatch) -> None:
    from hermes.data.catalog import load_catalog

    dataset, _ = write_reference(tmp_path / "data")
    save_image(dataset / "imagesTs" / "c1_0000.nii.gz", ct_volume((12, 10, 8)), AFFINE)
    monkeypatch.chdir(tmp_path)
    target = Path("sub") / "catalog.yaml"
    assert main(["catalog", "init", "data/Dataset101_Toy", "-o", str(target)]) == 0
    assert "path: ../data/Dataset101_Toy" in target.read_text()
    monkeypatch.chdir(tmp_path / "sub")  # read from elsewhere: the paths still resolve
    catalog = load_catalog("catalog.yaml")
    assert catalog.datasets[0].path.resolve() == dataset.resolve()
    monkeypatch.chdir(tmp_path)
    fails(tmp_path, ["catalog", "init", "data/Dataset101_Toy", "-o", str(target)], capsys, target, "--overwrite")
    assert main(["catalog", "init", "data/Dataset101_Toy", "-o", str(target), "--overwrite"]) == 0


# ----------------------------------------------------------------------------------------------
# Cases that were already handled: kept as regressions
# ----------------------------------------------------------------------------------------------
def write_train_dataset(root: Path, damage: str) -> tuple[Path, Path]:
    """A two-case training dataset (c2 damaged as ``damage``) and a catalog listing it."""
    dataset = root / "raw data é" / "Dataset102_BadToy"  # spaces/unicode in the path (not the name)
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 2,
            "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    for case in ("c1", "c2"):
        image = ct_volume((16, 14, 12)).astype(np.float32)
        label = np.zeros((16, 14, 12), np.uint8)
        label[4:10, 4:10, 4:8] = 1
        label_affine = AFFINE
        if case == "c2":
            if damage == "label_shape":
                label = label[:, :, :10]
            elif damage == "label_affine":
                label_affine = np.diag([2.0, 2.0, 3.0, 1.0])
            elif damage == "label_value":
                label[0, 0, 0] = 5
            elif damage == "inf_image":
                image[1, 1, 1] = np.inf
        save_image(dataset / "imagesTr" / f"{case}_0000.nii.gz", image, AFFINE)
        save_image(dataset / "labelsTr" / f"{case}.nii.gz", label, label_affine)
    image_c2 = dataset / "imagesTr" / "c2_0000.nii.gz"
    if damage == "zero_byte":
        image_c2.write_bytes(b"")
    elif damage == "text":
        image_c2.write_text("this is not an image")
    elif damage == "truncated":
        image_c2.write_bytes(image_c2.read_bytes()[:200])
    elif damage == "json_syntax":
        (dataset / "dataset.json").write_text("{not json")
    elif damage == "json_labels":
        (dataset / "dataset.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "labels"}))
    elif damage == "missing_label":
        (dataset / "labelsTr" / "c2.nii.gz").unlink()
    catalog = root / "catalog.yaml"
    catalog.write_text(f"datasets:\n  - path: '{dataset}'\n")
    return dataset, catalog


@pytest.mark.parametrize(
    "damage, culprit, message",
    [
        ("label_shape", "labelsTr/c2.nii.gz", "label shape"),
        ("label_affine", "labelsTr/c2.nii.gz", "label affine differs"),
        ("label_value", "labelsTr/c2.nii.gz", "label values [5]"),
        ("inf_image", "imagesTr/c2_0000.nii.gz", "NaN or infinite"),
        ("zero_byte", "imagesTr/c2_0000.nii.gz", "corrupt"),
        ("text", "imagesTr/c2_0000.nii.gz", "corrupt"),
        ("truncated", "imagesTr/c2_0000.nii.gz", "corrupt"),
        ("json_syntax", "dataset.json", "not valid JSON"),
        ("json_labels", "dataset.json", "'labels'"),
        ("missing_label", "imagesTr/c2_0000.nii.gz", "without a label"),
    ],
)
def test_prepare_refuses_bad_datasets(tmp_path: Path, capsys, damage: str, culprit: str, message: str) -> None:
    dataset, catalog = write_train_dataset(tmp_path, damage)
    err = fails(tmp_path, ["prepare", catalog, "--out", tmp_path / "cache", "--quiet", "--workers", "1"], capsys,
                dataset / culprit, message)
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["missing", "zero_byte", "text", "truncated", "nan", "inf", "flat_2d", "five_d"])
def test_predict_refuses_bad_images(model_dir: Path, tmp_path: Path, capsys, damage: str) -> None:
    image = tmp_path / "in put ü" / "case_0000.nii.gz"
    array = ct_volume().astype(np.float32)
    if damage == "nan":
        array[3, 3, 3] = np.nan
    elif damage == "inf":
        array[3, 3, 3] = -np.inf
    elif damage == "flat_2d":
        array = array[:, :, :1]
    elif damage == "five_d":
        array = np.zeros((6, 6, 6, 2, 2), np.float32)
    if damage != "missing":
        import nibabel as nib

        image.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(array, AFFINE), str(image))
    if damage == "zero_byte":
        image.write_bytes(b"")
    elif damage == "text":
        image.write_text("definitely not gzip")
    elif damage == "truncated":
        image.write_bytes(image.read_bytes()[:-500])
    else:
        (tmp_path / "keep.txt").write_text("x")
    fails(tmp_path, predict_args(model_dir, image, tmp_path / "seg.nii.gz"), capsys, image)
    assert not (tmp_path / "seg.nii.gz").exists()


class _Payload:
    """Unpickling this creates a marker file: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.marker), "unpickled!"))  # type: ignore[return-value]


@pytest.mark.parametrize("where", ["weights", "torch_checkpoint"])
def test_pickled_model_files_are_never_unpickled(model_dir: Path, tmp_path: Path, capsys, where: str) -> None:
    import pickle

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"state_dict": _Payload(marker)})
    if where == "weights":
        culprit = model / "weights.safetensors"
        culprit.write_bytes(payload)
    else:  # a PyTorch-style checkpoint instead of the safetensors file
        (model / "weights.safetensors").unlink()
        (model / "model.pt").write_bytes(payload)
        culprit = model
    image = save_image(tmp_path / "ct.nii.gz", ct_volume(), AFFINE)
    fails(tmp_path, predict_args(model_dir.parent / "nonexistent", image, tmp_path / "x.nii.gz"), capsys,
          model_dir.parent / "nonexistent")
    fails(tmp_path, predict_args(model, image, tmp_path / "seg.nii.gz"), capsys, culprit)
    assert not marker.exists()


def test_evaluate_model_refuses_undeclared_reference_values(tmp_path: Path, capsys) -> None:
    dataset, ref = write_reference(tmp_path / "raw", (1, 3))
    save_image(dataset / "imagesTs" / "c1_0000.nii.gz", ct_volume((12, 10, 8)), AFFINE)
    save_image(dataset / "imagesTr" / "c0_0000.nii.gz", ct_volume((12, 10, 8)), AFFINE)
    save_image(dataset / "labelsTr" / "c0.nii.gz", np.zeros((12, 10, 8), np.uint8), AFFINE)
    meta = json.loads((dataset / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps({**meta, "numTraining": 1}))
    model = make_model_dir(tmp_path / "model", datasets=(("Toy", "CT", ("liver", "spleen"), dataset),))
    args = ["evaluate", "-m", model, "--quiet", "--workers", "1", "--bootstrap", "10", "--device", "cpu",
            "--overlap", "0"]
    fails(tmp_path, args, capsys, ref, "label value(s) 3 not declared", "dataset.json")
    assert main([str(a) for a in args] + ["--ignore-undeclared"]) == 0
