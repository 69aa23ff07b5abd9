"""DICOM outputs of ``hermes predict``: DICOM-SEG (highdicom) and RTSTRUCT (rt-utils).

A PACS or a treatment-planning system takes segmentations back only as DICOM objects that
reference the images they were drawn on. Both writers take a :class:`Prediction` (masks on the
input's own voxel grid, RAS affine) and the source series, and put each task's mask on the
series' own pixel grid slice by slice:

* every source slice's pixels are mapped through its ImagePositionPatient /
  ImageOrientationPatient / PixelSpacing into the prediction's voxel grid; each pixel must land
  on a voxel centre (0.05 voxel tolerance) inside the grid, so the geometry is identical by
  construction (a NIfTI input with ``--reference-series`` must be the same voxels in any storage
  order, e.g. dcm2niix's flipped rows), otherwise a :class:`DataError` names the slice;
* DICOM-SEG: one BINARY segment per task (overlaps allowed, as the binary NIfTI output), label =
  task name, SNOMED CT property codes (below), the source images referenced by
  SOPInstanceUID, study and frame of reference copied from the series;
* RTSTRUCT: one ROI per task, its contours traced by rt-utils (OpenCV, every boundary pixel, no
  approximation) on each source slice; a hole is an inner contour. Filled back by rt-utils' reader
  the contours give the mask exactly, holes included (tests/test_dicom_out.py); planning systems
  that rasterise contours differently may differ by boundary pixels, as for any RTSTRUCT.

**Codes.** A task's segmented property type is the catalog's ``snomed`` code of the task when
the catalog gives one (``snomed: {liver: "10200004"}`` in a dataset entry; meaning from pydicom's
dictionary, else the label name), otherwise looked up by its label name in pydicom's SNOMED
CT dictionary (``liver`` -> SCT 10200004 "Liver", ``kidney_left`` -> "Kidney", laterality words
dropped); a tumour/lesion-like name gets the category "Morphologically abnormal structure" and,
when not found, the type "Neoplasm"; anything else not found is "Anatomical structure" /
"Organ" (generic, but valid and honest).

**Blank UIDs.** Anonymisers sometimes blank the UIDs (the realmini series has empty
SOPInstanceUID, StudyInstanceUID and SeriesInstanceUID). A blank SOP Instance/Class UID is taken
from the file meta header (the same instance's UID, exactly). A blank Study/Series/Frame of
Reference UID cannot be recovered: a UID derived from the series' SOP Instance UIDs is used
(deterministic, so the SEG and the RTSTRUCT of one series agree) and a warning is printed; such
objects reference the images but not a study a PACS knows.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from hermes import __version__
from hermes.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.sr.coding import Code

    from hermes.data.catalog import Catalog
    from hermes.inference.predictor import Prediction, Predictor

OutputFormat = Literal["nifti", "dicom-seg", "rtstruct"]
DICOM_FORMATS: tuple[str, ...] = ("dicom-seg", "rtstruct")
SUFFIX = {"dicom-seg": "_seg.dcm", "rtstruct": "_rtstruct.dcm"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_GRID_TOLERANCE = 0.05  # voxels
_ABNORMAL = re.compile(r"tumou?r|lesion|cancer|metasta|nodule|neoplasm|carcinoma|edema|oedema|necro|enhanc")
_LATERALITY = {"left", "right", "l", "r", "lt", "rt", "upper", "lower", "inferior", "superior"}


# ----------------------------------------------------------------------------------------------
# Source series
# ----------------------------------------------------------------------------------------------
@dataclass
class SourceSeries:
    """The headers (no pixel data) of one DICOM image series, in the reader's slice order."""

    path: Path
    datasets: list[Dataset]
    derived: list[str] = field(default_factory=list)  # keywords whose blank UID was derived

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def _series_files(path: Path) -> list[str]:
    """The files of the folder's one series, in GDCM's order (the order ``load_image`` reads)."""
    import SimpleITK as sitk

    if not path.is_dir():
        raise DataError(f"{path}: not a DICOM series folder")
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if len(series) != 1:
        raise DataError(f"{path}: expected one DICOM series, found {len(series)}")
    return list(reader.GetGDCMSeriesFileNames(str(path), series[0]))


def read_series(path: str | Path) -> SourceSeries:
    """Headers of a DICOM series folder, with blank UIDs filled as the module docstring says."""
    import pydicom
    from pydicom.uid import generate_uid

    path = Path(path)
    datasets = []
    for file in _series_files(path):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception as error:  # pydicom raises several types for unreadable files
            raise DataError(f"{file}: unreadable DICOM file: {error}") from None
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                                      ("SOPClassUID", "MediaStorageSOPClassUID")):
            if not str(ds.get(keyword, "") or ""):
                value = str(getattr(meta, meta_keyword, "") or "") if meta is not None else ""
                if not value:
                    raise DataError(f"{file}: no {keyword} (neither in the dataset nor in its file meta)")
                setattr(ds, keyword, value)
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if keyword not in ds:
                raise DataError(f"{file}: no {keyword}; cannot place the segmentation on this image")
        datasets.append(ds)
    sop_uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    if len(set(sop_uids)) != len(sop_uids):
        raise DataError(f"{path}: duplicate SOPInstanceUIDs in the series")
    derived = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "") or "") for ds in datasets}
        if len(values) > 1:
            raise DataError(f"{path}: the slices disagree on {keyword} ({', '.join(sorted(values))})")
        if values == {""}:
            uid = generate_uid(entropy_srcs=["hermes", keyword, *sop_uids])
            for ds in datasets:
                setattr(ds, keyword, uid)
            derived.append(keyword)
    if derived:
        print(
            f"warning: {path}: blank {', '.join(derived)} in the source series; the DICOM output uses UIDs "
            "derived from its SOPInstanceUIDs",
            file=sys.stderr,
        )
    return SourceSeries(path, datasets, derived)


# ----------------------------------------------------------------------------------------------
# Geometry: prediction voxels -> source pixels
# ----------------------------------------------------------------------------------------------
def _pixel_to_voxel(ds: Dataset, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, per-row step, per-column step) of a slice's pixels in the prediction's voxel
    coordinates."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))

    def to_voxel(lps: np.ndarray, point: bool) -> np.ndarray:
        ras = _LPS_TO_RAS @ lps
        return inverse[:3, :3] @ ras + (inverse[:3, 3] if point else 0.0)

    # The column index moves along the row direction (first triplet), the row index along the
    # column direction (second triplet).
    return (
        to_voxel(position, True),
        to_voxel(orientation[3:] * row_spacing, False),
        to_voxel(orientation[:3] * column_spacing, False),
    )


def slice_indices(series: SourceSeries, affine: np.ndarray, shape: tuple[int, ...]) -> list[tuple[np.ndarray, ...]]:
    """For each source slice: integer voxel indices ``(i, j, k)``, each (Rows, Columns), of its
    pixels in a volume of ``shape`` with ``affine``; a pixel off the grid is an error."""
    indices = []
    total = 0
    for number, ds in enumerate(series.datasets):
        origin, per_row, per_column = _pixel_to_voxel(ds, affine)
        rows = np.arange(int(ds.Rows), dtype=np.float64)[:, None, None]
        columns = np.arange(int(ds.Columns), dtype=np.float64)[None, :, None]
        voxel = origin + rows * per_row + columns * per_column  # (R, C, 3)
        rounded = np.rint(voxel)
        error = float(np.abs(voxel - rounded).max())
        where = f"{series.path}: slice {number + 1} (InstanceNumber {ds.get('InstanceNumber', '?')})"
        if error > _GRID_TOLERANCE:
            raise DataError(f"{where}: its pixels are {error:.2f} voxel off the image grid; the image and the "
                            "reference series must be the same voxels")
        index = rounded.astype(np.int64)
        if (index < 0).any() or (index >= np.asarray(shape[:3])).any():
            raise DataError(f"{where}: outside the image grid {tuple(shape[:3])}; the image and the reference "
                            "series must be the same voxels")
        indices.append((index[..., 0], index[..., 1], index[..., 2]))
        total += index[..., 0].size
    if total != int(np.prod(shape[:3])):
        raise DataError(f"{series.path}: {total} pixels in the series but {int(np.prod(shape[:3]))} voxels in the "
                        "image; the image and the reference series must be the same voxels")
    return indices


def series_frames(mask: np.ndarray, indices: list[tuple[np.ndarray, ...]]) -> np.ndarray:
    """A volume on the prediction grid as (slices, Rows, Columns), in the series' order."""
    return np.stack([mask[i, j, k] for i, j, k in indices])


# ----------------------------------------------------------------------------------------------
# Codes
# ----------------------------------------------------------------------------------------------
@functools.cache
def _snomed_names() -> dict[str, str]:
    """pydicom's SNOMED CT keywords by lower-case name (``brainstem`` -> ``BrainStem``)."""
    from pydicom.sr.codedict import codes

    return {name.lower(): name for name in codes.SCT.dir()}


@functools.cache
def _snomed_by_value() -> dict[str, str]:
    """pydicom's SNOMED CT keywords by concept id (``10200004`` -> ``Liver``)."""
    from pydicom.sr.codedict import codes

    return {str(getattr(codes.SCT, name).value): name for name in codes.SCT.dir()}


def catalog_codes(catalog: Catalog) -> dict[str, str]:
    """Task name -> SNOMED CT concept id from the catalog's ``snomed`` entries (first dataset
    that gives one for a shared task)."""
    found: dict[str, str] = {}
    for entry in catalog.datasets:
        for local, task_id in zip(entry.local_names, entry.task_ids):
            if local in entry.snomed:
                found.setdefault(catalog.tasks[task_id].name, entry.snomed[local])
    return found


def segment_codes(task: str, code: str | None = None) -> tuple[Code, Code]:
    """(segmented property category, type) for a task name, as the module docstring says;
    ``code``: the catalog's SNOMED CT concept id for it."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    label = task.rsplit("/", 1)[-1]
    words = [w for w in re.split(r"[^A-Za-z0-9]+", label.lower()) if w]
    abnormal = bool(_ABNORMAL.search(label.lower()))
    category = codes.SCT.MorphologicallyAbnormalStructure if abnormal else codes.SCT.AnatomicalStructure
    if code is not None:
        known = _snomed_by_value().get(code)
        return category, getattr(codes.SCT, known) if known else Code(code, "SCT", label[:64])
    candidates = [words, [w for w in words if w not in _LATERALITY]]
    for candidate in candidates:
        name = _snomed_names().get("".join(candidate))
        if name:
            return category, getattr(codes.SCT, name)
    return category, codes.SCT.Neoplasm if abnormal else codes.SCT.Organ


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
def _task_frames(prediction: Prediction, indices: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    return [series_frames(prediction.mask(task), indices) for task in prediction.tasks]


def write_dicom_seg(
    prediction: Prediction, series: SourceSeries, path: str | Path, overwrite: bool = False,
    codes_of_tasks: dict[str, str] | None = None,
) -> Path:
    """One BINARY DICOM-SEG instance with one segment per task of ``prediction``;
    ``codes_of_tasks``: task name -> SNOMED CT concept id (:func:`catalog_codes`)."""
    try:
        import highdicom as hd
    except ImportError as error:
        raise ConfigError(f"--format dicom-seg needs highdicom ({error}); pip install highdicom") from None
    from pydicom.sr.codedict import codes

    path = Path(path)
    _check_target(path, overwrite)
    indices = slice_indices(series, prediction.affine, prediction.shape)
    frames = np.stack(_task_frames(prediction, indices), axis=-1).astype(np.uint8)  # (slices, R, C, tasks)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="Hermes", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, task in enumerate(prediction.tasks, start=1):
        category, kind = segment_codes(task, (codes_of_tasks or {}).get(task))
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=task[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=task[:64],
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom's notes on optional attributes
        seg = hd.seg.Segmentation(
            source_images=series.datasets,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=_series_number(series),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="Hermes",
            manufacturer_model_name=_model_name(prediction),
            software_versions=__version__,
            device_serial_number="0",
            series_description=f"Hermes segmentation ({len(prediction.tasks)} tasks)"[:64],
            omit_empty_frames=False,
        )
    return _atomic_save(seg, path)


def write_rtstruct(prediction: Prediction, series: SourceSeries, path: str | Path, overwrite: bool = False) -> Path:
    """One RTSTRUCT with one ROI per task (rt-utils traces the contours slice by slice)."""
    try:
        from rt_utils import ds_helper, image_helper
        from rt_utils.rtstruct import RTStruct
    except ImportError as error:
        raise ConfigError(f"--format rtstruct needs rt-utils ({error}); pip install rt-utils") from None

    path = Path(path)
    _check_target(path, overwrite)
    # rt-utils numbers slices in its own order (ascending position along the slice normal).
    ordered = SourceSeries(series.path, sorted(series.datasets, key=image_helper.get_slice_position), series.derived)
    indices = slice_indices(ordered, prediction.affine, prediction.shape)
    # rt-utils sets pydicom 2's encoding flags, which pydicom 3 warns about (and logs) on every run.
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            structure = RTStruct(ordered.datasets, ds_helper.create_rtstruct_dataset(ordered.datasets))
    finally:
        pydicom_log.setLevel(level)
    ds = structure.ds
    ds.Manufacturer = "Hermes"
    ds.ManufacturerModelName = _model_name(prediction)
    ds.SoftwareVersions = __version__
    ds.InstitutionName = str(series.datasets[0].get("InstitutionName", "") or "")
    ds.StructureSetLabel = "Hermes"
    ds.SeriesDescription = f"Hermes structures ({len(prediction.tasks)} tasks)"[:64]
    ds.SeriesNumber = _series_number(series)
    for task, frames in zip(prediction.tasks, _task_frames(prediction, indices)):
        if not frames.any():
            print(f"note: {task}: empty mask, written as an ROI without contours", file=sys.stderr)
        structure.add_roi(
            mask=np.ascontiguousarray(frames.transpose(1, 2, 0)).astype(bool),  # (Rows, Columns, slices)
            name=task[:64],
            approximate_contours=False,
            roi_generation_algorithm="AUTOMATIC",
        )
    return _atomic_save(ds, path)


def _model_name(prediction: Prediction) -> str:
    return (Path(prediction.model_dir).name if prediction.model_dir else "Hermes")[:64]


def _series_number(series: SourceSeries) -> int:
    try:
        return int(series.datasets[0].get("SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        return 1000


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")


def _atomic_save(ds: Dataset, path: Path) -> Path:
    from hermes.fileio import atomic_write

    dataset = copy.copy(ds)
    return atomic_write(path, lambda handle: dataset.save_as(handle, enforce_file_format=True))


def dicom_target(output: Path, case_id: str, fmt: str) -> Path:
    """``OUTPUT`` itself when it names a .dcm file, else ``OUTPUT/<case>_seg.dcm`` (or
    ``_rtstruct.dcm``)."""
    if output.name.lower().endswith(".dcm"):
        return output
    return output / f"{case_id}{SUFFIX[fmt]}"


def write_dicom(
    prediction: Prediction, series: SourceSeries, path: Path, fmt: str, overwrite: bool = False,
    codes_of_tasks: dict[str, str] | None = None,
) -> Path:
    if fmt == "dicom-seg":
        return write_dicom_seg(prediction, series, path, overwrite, codes_of_tasks)
    if fmt == "rtstruct":
        return write_rtstruct(prediction, series, path, overwrite)
    raise ConfigError(f"unknown DICOM format {fmt!r} (one of {', '.join(DICOM_FORMATS)})")


__all__ = [
    "DICOM_FORMATS",
    "OutputFormat",
    "SourceSeries",
    "catalog_codes",
    "dicom_target",
    "predict_dicom_files",
    "read_series",
    "segment_codes",
    "slice_indices",
    "write_dicom",
    "write_dicom_seg",
    "write_rtstruct",
]


def predict_dicom_files(
    predictor: Predictor,
    input: str | Path,
    output: str | Path,
    fmt: str,
    reference_series: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    modality: str | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Path]:
    """``hermes predict --format dicom-seg|rtstruct``: one case (a DICOM series, or an image with
    the DICOM series it was converted from) -> one DICOM object; returns ``{case_id: path}``."""
    from hermes.inference.api import discover_inputs
    from hermes.inference.predictor import describe

    if fmt not in DICOM_FORMATS:
        raise ConfigError(f"unknown DICOM format {fmt!r} (one of {', '.join(DICOM_FORMATS)})")
    cases, folder_input = discover_inputs(input)
    if folder_input and len(cases) != 1:
        raise ConfigError(
            f"--format {fmt}: {input} holds {len(cases)} cases; give one DICOM series (or one image with "
            "--reference-series) per run"
        )
    case = cases[0]
    source = reference_series if reference_series is not None else case.source
    if not Path(source).is_dir():
        raise ConfigError(
            f"--format {fmt}: {case.source} is not a DICOM series; pass --reference-series DICOM_DIR "
            "(the series the image was converted from)"
        )
    target = dicom_target(Path(output), case.case_id, fmt)
    _check_target(target, overwrite)
    series = read_series(source)
    image = predictor.load_case(case.paths[0] if len(case.paths) == 1 else list(case.paths))
    slice_indices(series, image.affine, image.array.shape)  # refuse a different grid before the work
    prediction = predictor.predict(
        image, tasks=tasks, modality=modality, progress=progress, verbose=verbose, dataset=dataset
    )
    write_dicom(prediction, series, target, fmt, overwrite=overwrite, codes_of_tasks=catalog_codes(predictor.catalog))
    if verbose:
        print(f"{case.case_id}: {describe(prediction)} -> {target}", file=sys.stderr)
    return {case.case_id: target}
