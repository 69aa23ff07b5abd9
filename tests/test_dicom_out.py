"""`hermes predict --format dicom-seg|rtstruct`: read back with highdicom / pydicom / rt-utils,
masks voxel for voxel against the NIfTI output of the same prediction, UIDs of the source series."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from inference_helpers import make_model_dir

from hermes.cli import main
from hermes.data.imageio import load_image
from hermes.inference.dicom_out import _series_files, segment_codes
from hermes.inference.predictor import Predictor, safe_name

TASKS = ("CTSet/liver", "CTSet/kidney")


def _fake_network(
    self: Predictor,
    prompt: Sequence[int],
    keep: Sequence[int],
    modality_id: int,
    channels: dict[str, torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Deterministic logits from the normalised CT (no training needed): task 0 = soft tissue
    and brighter (HU > -260), task 1 = bone/contrast (HU > 190); they overlap."""

    def network(batch: torch.Tensor) -> torch.Tensor:
        x = batch[:, :1]
        return torch.cat([8.0 * (x + 1.0 - 1.5 * t) for t in keep], dim=1)

    return network


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 mm: coarse and fast; geometry and formats are tested, not segmentation quality.
    model = make_model_dir(tmp_path_factory.mktemp("model") / "model", spacing=(8.0, 8.0, 8.0))
    # A catalog SNOMED code, as `hermes train` records the catalog's `snomed:` entries.
    spec = json.loads((model / "spec.json").read_text())
    spec["datasets"][0]["snomed"] = {"kidney": "9846003"}  # overrides the name lookup (Kidney)
    (model / "spec.json").write_text(json.dumps(spec))
    return model


@pytest.fixture()
def fake_net(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Predictor, "_network", _fake_network)


@pytest.fixture(scope="module")
def series_with_uids(realmini_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The realmini series with its blanked UIDs filled in (as a PACS would hold it)."""
    out = tmp_path_factory.mktemp("series") / "dicom"
    out.mkdir()
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for file in sorted((realmini_root / "dicom_ct_example" / "dicom").iterdir()):
        ds = pydicom.dcmread(file)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID = "HERMES-TEST"
        ds.save_as(out / file.name)
    return out


def _predict(model: Path, source: Path, out: Path, *extra: str) -> None:
    args = ["predict", "-m", str(model), "-i", str(source), "-o", str(out), "--modality", "CT",
            "--tasks", *TASKS, "--quiet", "--overlap", "0", *extra]
    assert main(args) == 0


def _nifti_masks(folder: Path) -> dict[str, np.ndarray]:
    return {task: load_image(folder / f"{safe_name(task)}.nii.gz").array.astype(bool) for task in TASKS}


def _frames_by_sop(series: Path, volume: np.ndarray) -> dict[str, np.ndarray]:
    """(Rows, Columns) frame of each source SOP instance, taken from a volume on the grid that
    ``load_image(series)`` reads (ITK index order: column, row, file order)."""
    frames = {}
    for k, file in enumerate(_series_files(series)):
        header = pydicom.dcmread(file, stop_before_pixels=True)
        uid = str(header.SOPInstanceUID or header.file_meta.MediaStorageSOPInstanceUID)
        frames[uid] = volume[:, :, k].T
    return frames


@pytest.mark.slow
@pytest.mark.realmini
def test_dicom_seg_equals_nifti_and_references_the_series(
    model_dir: Path, series_with_uids: Path, tmp_path: Path, fake_net: None
) -> None:
    import highdicom as hd

    _predict(model_dir, series_with_uids, tmp_path / "nifti", "--output", "binary")
    _predict(model_dir, series_with_uids, tmp_path / "seg.dcm", "--format", "dicom-seg", "--output", "binary")
    nifti = _nifti_masks(tmp_path / "nifti")
    assert all(mask.any() for mask in nifti.values()) and (nifti[TASKS[0]] & nifti[TASKS[1]]).any()
    assert not np.array_equal(nifti[TASKS[0]], nifti[TASKS[1]])

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in _series_files(series_with_uids)]
    sop_uids = [str(ds.SOPInstanceUID) for ds in source]
    # UIDs: same study and frame of reference, the source series and every one of its images.
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.PatientID == "HERMES-TEST"
    assert seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert sorted(item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence) == sorted(sop_uids)
    # Segments named after the tasks, with SNOMED codes.
    labels = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    assert labels == {1: TASKS[0], 2: TASKS[1]}
    liver = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodingSchemeDesignator, liver.CodeValue) == ("SCT", "10200004")  # by name
    kidney = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeValue == "9846003"  # from the catalog
    # Masks voxel for voxel, frame by frame through each source image's SOP Instance UID.
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[1, 2])
    for number, task in enumerate(TASKS):
        expected = _frames_by_sop(series_with_uids, nifti[task])
        for uid, frame in zip(sop_uids, pixels[..., number]):
            assert np.array_equal(frame.astype(bool), expected[uid]), (task, uid)


@pytest.mark.slow
@pytest.mark.realmini
def test_rtstruct_equals_nifti_and_references_the_series(
    model_dir: Path, series_with_uids: Path, tmp_path: Path, fake_net: None
) -> None:
    from rt_utils import RTStructBuilder

    _predict(model_dir, series_with_uids, tmp_path / "nifti", "--output", "binary")
    _predict(model_dir, series_with_uids, tmp_path / "out", "--format", "rtstruct", "--output", "binary")
    written = tmp_path / "out" / "dicom_rtstruct.dcm"
    ds = pydicom.dcmread(written)
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in _series_files(series_with_uids)]
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == source[0].StudyInstanceUID
    (frame_ref,) = ds.ReferencedFrameOfReferenceSequence
    assert frame_ref.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    (study_ref,) = frame_ref.RTReferencedStudySequence
    assert study_ref.ReferencedSOPInstanceUID == source[0].StudyInstanceUID
    (series_ref,) = study_ref.RTReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in series_ref.ContourImageSequence) == sorted(
        str(s.SOPInstanceUID) for s in source
    )
    # The NIfTI masks equal the contours filled back (rt-utils' reader), slice by slice.
    nifti = _nifti_masks(tmp_path / "nifti")
    structure = RTStructBuilder.create_from(str(series_with_uids), str(written))
    assert structure.get_roi_names() == list(TASKS)
    uids = [str(s.SOPInstanceUID) for s in structure.series_data]  # rt-utils' slice order
    for task in TASKS:
        mask = structure.get_roi_mask_by_name(task)  # (Rows, Columns, slices)
        assert mask.any()
        expected = _frames_by_sop(series_with_uids, nifti[task])
        for i, uid in enumerate(uids):
            assert np.array_equal(mask[:, :, i], expected[uid]), (task, i)


@pytest.mark.slow
@pytest.mark.realmini
def test_blank_uids_nifti_input_with_reference_series_and_errors(
    model_dir: Path, realmini_root: Path, tmp_path: Path, fake_net: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import highdicom as hd

    dicom = realmini_root / "dicom_ct_example" / "dicom"
    _predict(model_dir, dicom, tmp_path / "a.dcm", "--format", "dicom-seg")
    _predict(model_dir, dicom, tmp_path / "b.dcm", "--format", "rtstruct")
    assert "blank StudyInstanceUID, SeriesInstanceUID" in capsys.readouterr().err
    seg, rt = hd.seg.segread(tmp_path / "a.dcm"), pydicom.dcmread(tmp_path / "b.dcm")
    meta_uids = sorted(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
                       for f in dicom.iterdir())
    (referenced,) = seg.ReferencedSeriesSequence
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == meta_uids
    # Derived study/series UIDs are deterministic: the SEG and the RTSTRUCT agree.
    series_ref = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert seg.StudyInstanceUID == rt.StudyInstanceUID and referenced.SeriesInstanceUID == series_ref.SeriesInstanceUID

    # The same series as NIfTI (dcm2niix grid: rows flipped) + --reference-series: the same SEG masks.
    nifti = realmini_root / "Dataset505_TotalSegCT" / "imagesTs" / "totalseg_example_ct_dicom_0000.nii.gz"
    _predict(model_dir, nifti, tmp_path / "c.dcm", "--format", "dicom-seg", "--reference-series", str(dicom))
    again = hd.seg.segread(tmp_path / "c.dcm")
    uids = meta_uids
    first = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    second = again.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    assert first.any() and (first != second).mean() < 1e-3  # resampling order differs by float rounding

    # Errors: no reference for a NIfTI input; a reference of other voxels; an existing output.
    assert main(["predict", "-m", str(model_dir), "-i", str(nifti), "-o", str(tmp_path / "d.dcm"),
                 "--modality", "CT", "--format", "dicom-seg", "--quiet"]) == 2
    assert "--reference-series" in capsys.readouterr().err
    other = realmini_root / "Dataset505_TotalSegCT" / "imagesTs" / "totalseg_example_ct_0000.nii.gz"
    assert main(["predict", "-m", str(model_dir), "-i", str(other), "-o", str(tmp_path / "e.dcm"), "--modality",
                 "CT", "--format", "rtstruct", "--reference-series", str(dicom), "--quiet"]) == 2
    assert "same voxels" in capsys.readouterr().err
    assert not (tmp_path / "e.dcm").exists()
    assert main(["predict", "-m", str(model_dir), "-i", str(dicom), "-o", str(tmp_path / "a.dcm"),
                 "--modality", "CT", "--format", "dicom-seg", "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err


def test_segment_codes() -> None:
    assert segment_codes("AbdomenCT/liver")[1].value == "10200004"
    assert segment_codes("TotalSeg/kidney_left")[1].meaning == "Kidney"
    assert segment_codes("HeadNeckCT/Brainstem")[1].value == "119238007"
    category, kind = segment_codes("BrainTumourMR/enhancing_tumour")
    assert category.meaning == "Morphologically Abnormal Structure" and kind.meaning == "Neoplasm"
    assert segment_codes("X/not_an_organ_name")[1].meaning == "Organ"


