"""Integrity checks of a DICOM series folder before its voxels are used.

GDCM (behind SimpleITK's series reader) silently skips files it cannot parse and assumes
equally spaced slices: a series with a missing, corrupt or truncated slice comes back as a
volume with one slice fewer at a uniform, wrong spacing (e.g. 19 slices at 2.111 mm instead of
20 at 2 mm), so every slice position is wrong. :func:`check_series` reads every file's header
with pydicom first and refuses, naming the first offending file, unless:

* every file in the folder parses as DICOM and carries its pixel data in full (hidden files and
  a ``DICOMDIR`` media index are ignored; any other file is an error: one series per folder);
* all slices share one ImageOrientationPatient, Rows/Columns and PixelSpacing;
* the slice positions (ImagePositionPatient projected on the slice normal) are distinct and
  evenly spaced within :data:`SPACING_TOLERANCE`.

An irregular series (a gap, uneven spacing) can still be used when the user insists
(``allow_irregular``): :func:`resample_irregular` then interpolates the slices linearly along the
normal onto a regular grid that covers the true extent at about the median spacing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hermes.errors import DataError

# Slices are "evenly spaced" when every gap is within this fraction of the median gap (and at
# least 0.01 mm, the precision of positions written with two decimals).
SPACING_TOLERANCE = 0.01
# Two slices closer than this fraction of the median gap are duplicates.
DUPLICATE_FRACTION = 0.01
IGNORED_NAMES = frozenset({"DICOMDIR"})


@dataclass(frozen=True)
class SeriesGeometry:
    """Slice files sorted along the normal, with what is needed to place them in space (LPS)."""

    files: tuple[Path, ...]
    positions: np.ndarray  # (n,) position of each slice along the normal, ascending, mm
    row: np.ndarray  # direction of increasing column index (IOP[0:3])
    column: np.ndarray  # direction of increasing row index (IOP[3:6])
    normal: np.ndarray
    origin: np.ndarray  # ImagePositionPatient of the first slice
    pixel_spacing: tuple[float, float]  # (between columns, between rows), ITK's x, y order
    regular: bool
    problem: str  # why the series is irregular ('' when regular)

    @property
    def median_gap(self) -> float:
        return float(np.median(np.diff(self.positions)))


def series_files(folder: Path) -> list[Path]:
    """Every file of the folder that should be a slice (hidden files and DICOMDIR left out)."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in IGNORED_NAMES
    )


def _expected_pixel_bytes(ds: object) -> int:
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    bits = int(getattr(ds, "BitsAllocated", 16))
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    return int(ds.Rows) * int(ds.Columns) * samples * frames * bits // 8  # type: ignore[attr-defined]


def _read_header(path: Path) -> object:
    """The dataset of one slice; the pixel data is read too, to notice a truncated file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            # pydicom warns (and drops PixelData) when a file ends inside an element.
            warnings.simplefilter("ignore", UserWarning)
            ds = pydicom.dcmread(str(path))
    except InvalidDicomError:
        raise DataError(
            f"{path}: not a DICOM file (a series folder must hold only the slices of one series)"
        ) from None
    except Exception as error:  # pydicom raises many types on corrupt input
        raise DataError(f"{path}: unreadable DICOM file ({type(error).__name__}: {error})") from None
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns", "PixelSpacing"):
        if keyword not in ds:
            raise DataError(f"{path}: DICOM slice without {keyword} (truncated, or not an image slice)")
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM slice without complete pixel data (truncated file?)")
    if not ds.file_meta.TransferSyntaxUID.is_compressed and len(ds.PixelData) < _expected_pixel_bytes(ds):
        raise DataError(
            f"{path}: truncated DICOM pixel data ({len(ds.PixelData)} bytes, expected {_expected_pixel_bytes(ds)})"
        )
    return ds


def check_series(folder: Path, files: Sequence[Path] | None = None) -> SeriesGeometry:
    """Read every slice header of ``folder`` and check the series is complete and consistent.

    Raises :class:`DataError` naming the first offending file for anything that cannot be
    repaired (unreadable or truncated files, mixed orientation or matrix size, duplicate
    positions). Uneven spacing is *reported* in the returned geometry (``regular=False``) so
    that the caller can refuse or, if asked, resample.
    """
    files = list(files) if files is not None else series_files(folder)
    if not files:
        raise DataError(f"{folder}: a folder without a DICOM series (expected a DICOM folder or an image file)")
    headers = [(path, _read_header(path)) for path in files]
    first_path, first = headers[0]
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient])  # type: ignore[attr-defined]
    size = (int(first.Rows), int(first.Columns))  # type: ignore[attr-defined]
    spacing = tuple(float(v) for v in first.PixelSpacing)  # type: ignore[attr-defined]
    series_uid = getattr(first, "SeriesInstanceUID", None)
    for path, ds in headers[1:]:
        if getattr(ds, "SeriesInstanceUID", None) != series_uid:
            raise DataError(
                f"{path}: belongs to another DICOM series than {first_path.name}; put each series in its own folder"
            )
        other = np.asarray([float(v) for v in ds.ImageOrientationPatient])  # type: ignore[attr-defined]
        if not np.allclose(other, iop, atol=1e-4):
            raise DataError(
                f"{path}: ImageOrientationPatient {other.round(5).tolist()} differs from {first_path.name}'s "
                f"{iop.round(5).tolist()} (one orientation per series)"
            )
        if (int(ds.Rows), int(ds.Columns)) != size:  # type: ignore[attr-defined]
            raise DataError(
                f"{path}: {int(ds.Rows)}x{int(ds.Columns)} pixels, but {first_path.name} has {size[0]}x{size[1]}"  # type: ignore[attr-defined]
            )
        other_spacing = tuple(float(v) for v in ds.PixelSpacing)  # type: ignore[attr-defined]
        if not np.allclose(other_spacing, spacing, rtol=1e-4, atol=1e-6):
            raise DataError(f"{path}: PixelSpacing {list(other_spacing)} differs from {first_path.name}'s {list(spacing)}")
    if len(headers) < 2:
        raise DataError(f"{folder}: the DICOM series has {len(headers)} slice(s); Hermes needs 3D volumes")
    row, column = iop[:3], iop[3:]
    normal = np.cross(row, column)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DataError(f"{first_path}: ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors")
    ipp = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])  # type: ignore[attr-defined]
    along = ipp @ normal
    order = np.argsort(along, kind="stable")
    sorted_files = tuple(files[i] for i in order)
    positions = along[order]
    gaps = np.diff(positions)
    median = float(np.median(gaps))
    duplicate = np.flatnonzero(gaps <= max(DUPLICATE_FRACTION * median, 1e-4))
    if duplicate.size:
        i = int(duplicate[0])
        raise DataError(
            f"{sorted_files[i + 1]}: same slice position ({positions[i + 1]:.3f} mm along the normal) as "
            f"{sorted_files[i].name}; duplicate slices"
        )
    tolerance = max(SPACING_TOLERANCE * median, 0.01)
    uneven = np.flatnonzero(np.abs(gaps - median) > tolerance)
    problem = ""
    if uneven.size:
        i = int(uneven[0])
        missing = round(gaps[i] / median) - 1
        hint = f" ({missing} missing slice(s)?)" if missing >= 1 else ""
        problem = (
            f"{sorted_files[i + 1]}: slice gap of {gaps[i]:.3f} mm after {sorted_files[i].name}, but the series "
            f"spacing is {median:.3f} mm{hint}; {len(files)} slices over {positions[-1] - positions[0]:.3f} mm"
        )
    return SeriesGeometry(
        files=sorted_files,
        positions=positions,
        row=row,
        column=column,
        normal=normal,
        origin=ipp[order[0]],
        pixel_spacing=(spacing[1], spacing[0]),
        regular=not uneven.size,
        problem=problem,
    )


def resample_irregular(volume: np.ndarray, geometry: SeriesGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Slices (X, Y, Z in ``geometry.files`` order) onto a regular grid along the normal.

    The grid runs from the first to the last true slice position with ``n`` slices, ``n`` the
    count that makes the spacing closest to the median gap; every output slice is the linear
    interpolation of the two true slices around it. Returns ``(array float32, LPS affine)``.
    """
    positions = geometry.positions
    extent = float(positions[-1] - positions[0])
    count = max(round(extent / geometry.median_gap) + 1, 2)
    spacing = extent / (count - 1)
    targets = positions[0] + spacing * np.arange(count)
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = np.clip((targets - positions[lower]) / (positions[upper] - positions[lower]), 0.0, 1.0)
    data = volume.astype(np.float32, copy=False)
    out = data[:, :, lower] * (1.0 - weight).astype(np.float32) + data[:, :, upper] * weight.astype(np.float32)
    affine = np.eye(4)
    affine[:3, 0] = geometry.row * geometry.pixel_spacing[0]
    affine[:3, 1] = geometry.column * geometry.pixel_spacing[1]
    affine[:3, 2] = geometry.normal * spacing
    affine[:3, 3] = geometry.origin
    return np.ascontiguousarray(out), affine
