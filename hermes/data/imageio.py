"""Reading and writing 3D medical images with one geometry convention.

Every image comes back as an :class:`Image`: the voxel array in the file's own voxel order and
a 4x4 voxel->world affine in RAS+ millimetres (nibabel's convention). NIfTI goes through
nibabel; NRRD/MetaImage and DICOM series go through SimpleITK, whose LPS direction/origin is
converted exactly (the first two world axes flip sign). Keeping the file's own voxel order and
only *describing* it by the affine means nothing is resampled on reading; the pipeline
reorients to RAS explicitly with :func:`reorient_to_ras` and undoes it with
:func:`reorient_from_ras` when writing predictions back on the original grid.

Everything a user can get wrong (missing file, truncated gzip, a 2D image, NaNs) raises
:class:`hermes.errors.DataError` naming the file.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel import orientations as nio

from hermes.errors import DataError
from hermes.fileio import atomic_write_bytes

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

# SimpleITK stores LPS+; multiplying x and y by -1 gives nibabel's RAS+.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def image_suffix(path: str | Path) -> str:
    """The (possibly double) suffix that decides the format, lower-cased ('' if unknown)."""
    name = Path(path).name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis: the length of the affine's first three columns."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


@dataclass
class Image:
    """A volume and its geometry.

    ``array`` keeps the file's voxel order with the spatial axes first (a 4th axis only for
    multi-channel files); ``affine`` maps voxel indices of ``array`` to RAS+ mm.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass(frozen=True)
class Header:
    """Geometry of an image file without its voxels (for spacing statistics and planning)."""

    shape: tuple[int, ...]
    affine: np.ndarray
    path: Path
    dtype: np.dtype

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"image not found: {path}")


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir()


def _itk_affine(direction: tuple[float, ...], spacing: tuple[float, ...], origin: tuple[float, ...]) -> np.ndarray:
    """RAS affine of an ITK image: world_LPS = origin + D @ diag(spacing) @ index."""
    dim = len(spacing)
    d = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ d @ np.diag(np.asarray(spacing[:3], dtype=np.float64))
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin[:3], dtype=np.float64)
    return affine


def _sitk_to_image(sitk_image: object, path: Path) -> Image:
    import SimpleITK as sitk

    img: sitk.Image = sitk_image  # type: ignore[assignment]
    if img.GetDimension() < 3:
        raise DataError(f"{path}: a {img.GetDimension()}D image; Hermes needs 3D volumes")
    if img.GetDimension() > 3:
        # A 4D ITK image (x, y, z, t) is taken as channels when the 4th axis is short.
        arr = sitk.GetArrayFromImage(img)  # (t, z, y, x)
        array = np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0)))
    else:
        arr = sitk.GetArrayFromImage(img)  # (z, y, x) or (z, y, x, components)
        axes = (2, 1, 0, 3) if arr.ndim == 4 else (2, 1, 0)
        array = np.ascontiguousarray(np.transpose(arr, axes))
    affine = _itk_affine(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    return Image(array=array, affine=affine, path=path)


def _read_dicom_series(path: Path, allow_irregular: bool = False) -> Image:
    """A DICOM series folder, checked first by :func:`hermes.data.dicom.check_series`.

    GDCM alone skips unreadable files and assumes even spacing; the check refuses a series with
    a corrupt, truncated or missing slice (naming the file). ``allow_irregular`` resamples an
    unevenly spaced series onto a regular grid instead of refusing it (with a warning).
    """
    import SimpleITK as sitk

    from hermes.data.dicom import check_series, resample_irregular

    geometry = check_series(path)
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(path))
    except RuntimeError as error:
        raise DataError(f"{path}: cannot scan the folder for DICOM series: {error}") from None
    if not series:
        raise DataError(f"{path}: a folder without a DICOM series (expected a DICOM folder or an image file)")
    if len(series) > 1:
        raise DataError(
            f"{path}: the folder holds {len(series)} DICOM series ({', '.join(series)}); "
            "put each series in its own folder"
        )
    files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    skipped = sorted(set(geometry.files) - {Path(f) for f in files})
    if skipped:
        raise DataError(
            f"{skipped[0]}: not read as part of the series by GDCM ({len(files)} of {len(geometry.files)} "
            "slices read); a damaged or foreign slice"
        )
    if not geometry.regular:
        if not allow_irregular:
            raise DataError(
                f"irregular DICOM series {path}: {geometry.problem}; pass --allow-irregular to resample it "
                "onto a regular grid from its true slice positions"
            )
        files = [str(f) for f in geometry.files]  # sorted along the normal, as resampling expects
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as error:
        raise DataError(f"{path}: unreadable DICOM series: {error}") from None
    image = _sitk_to_image(img, path)
    if geometry.regular:
        return image
    array, affine_lps = resample_irregular(image.array, geometry)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    warnings.warn(
        f"WARNING: irregular DICOM series {path} resampled (--allow-irregular): {geometry.problem}; "
        f"now {array.shape[2]} slices at {spacing_of(affine)[2]:.3f} mm, linearly interpolated along the "
        "slice normal from the true positions",
        stacklevel=3,
    )
    return Image(array=array, affine=affine, path=path)


def _read_nifti(path: Path) -> Image:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        raise DataError(f"{path}: unreadable or corrupt NIfTI file: {error}") from None
    # NIfTI puts time at axis 3 and vector components at axis 4 (x, y, z, 1, c): drop the
    # empty time axis so that a channel axis, if any, is axis 3.
    while array.ndim > 4 and array.shape[3] == 1:
        array = array[:, :, :, 0]
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image(array=np.asarray(array), affine=np.asarray(img.affine, dtype=np.float64), path=path)


def _read_itk(path: Path) -> Image:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"{path}: unreadable or corrupt image file: {error}") from None
    return _sitk_to_image(img, path)


def _validate(image: Image) -> Image:
    path = image.path
    array = image.array
    if array.ndim < 3 or min(array.shape[:3]) < 2:
        raise DataError(f"{path}: a 2D image (shape {array.shape}); Hermes needs 3D volumes")
    if array.ndim > 4:
        raise DataError(f"{path}: {array.ndim}D image of shape {array.shape}; expected 3D or 3D + channels")
    if not np.all(np.isfinite(image.affine)) or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: invalid geometry (singular or non-finite affine)")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(f"{path}: {bad} voxel(s) are NaN or infinite")
    return image


def load_image(path: str | Path, allow_irregular: bool = False) -> Image:
    """Read a NIfTI / NRRD / MetaImage file or a DICOM series folder.

    ``allow_irregular``: resample an unevenly spaced DICOM series (a missing slice) onto a
    regular grid instead of refusing it (see :mod:`hermes.data.dicom`).
    """
    path = Path(path)
    _check_exists(path)
    if _is_dicom_dir(path):
        image = _read_dicom_series(path, allow_irregular)
    else:
        suffix = image_suffix(path)
        if suffix in NIFTI_SUFFIXES:
            image = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            image = _read_itk(path)
        else:
            raise DataError(
                f"{path}: unsupported image format (supported: {', '.join(SUPPORTED_SUFFIXES)} or a DICOM folder)"
            )
    return _validate(image)


def load_header(path: str | Path) -> Header:
    """Shape, affine and dtype of an image without reading its voxels.

    A DICOM folder is read in full (its geometry needs every slice position; series are
    small compared with what the header-only path saves on large NIfTI files).
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        image = load_image(path)
        return Header(image.shape, image.affine, path, image.array.dtype)
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        try:
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
            dtype = img.get_data_dtype()
        except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
            raise DataError(f"{path}: unreadable or corrupt NIfTI header: {error}") from None
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        affine = np.asarray(img.affine, dtype=np.float64)
    elif suffix in ITK_SUFFIXES:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise DataError(f"{path}: unreadable image header: {error}") from None
        size = reader.GetSize()
        if len(size) < 3:
            raise DataError(f"{path}: a {len(size)}D image; Hermes needs 3D volumes")
        shape = tuple(int(s) for s in size)
        if reader.GetNumberOfComponents() > 1:
            shape = (*shape, int(reader.GetNumberOfComponents()))
        affine = _itk_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
        dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * len(size), reader.GetPixelID(), reader.GetNumberOfComponents())).dtype)
    else:
        raise DataError(f"{path}: unsupported image format (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if len(shape) < 3:
        raise DataError(f"{path}: a {len(shape)}D image of shape {shape}; Hermes needs 3D volumes")
    return Header(shape, affine, path, np.dtype(dtype))


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _nifti_bytes(array: np.ndarray, affine: np.ndarray, reference: object | None) -> bytes:
    import nibabel as nib

    header = None
    if reference is not None and hasattr(reference, "header"):
        header = reference.header.copy()  # keeps units, description, intent of the source
    img = nib.Nifti1Image(array, affine, header=header)
    img.header.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    # sform and qform both set (code 1, scanner) so ITK, nibabel and nnU-Net read one geometry.
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img.to_bytes()


def _sitk_image(array: np.ndarray, affine: np.ndarray) -> object:
    import SimpleITK as sitk

    vector = array.ndim == 4
    axes = (2, 1, 0, 3) if vector else (2, 1, 0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, axes)), isVector=vector)
    spacing = np.asarray(spacing_of(affine))
    direction_lps = _LPS_TO_RAS @ (affine[:3, :3] / spacing)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in direction_lps.ravel()))
    img.SetOrigin(tuple(float(v) for v in _LPS_TO_RAS @ affine[:3, 3]))
    return img


def save_image(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    reference: Image | str | Path | None = None,
) -> Path:
    """Write ``array`` with ``affine`` (RAS+ mm) atomically; the format follows the suffix.

    ``reference`` (an image path or a NIfTI-backed image) only lends its NIfTI header fields
    (units, description); geometry always comes from ``affine``. ``.nii.gz`` is compressed with
    a fixed gzip time stamp so that equal arrays give byte-identical files (reproducible
    datasets and hashes in cache metadata).
    """
    path = Path(path)
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim not in (3, 4):
        raise DataError(f"{path}: cannot write a {array.ndim}D array (expected 3D or 3D + channels)")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.int64 or array.dtype == np.float16:
        # NIfTI-1 readers handle int64/float16 poorly; labels and images never need them.
        array = array.astype(np.int32 if array.dtype == np.int64 else np.float32)
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        ref_img = None
        if isinstance(reference, Image):
            reference = reference.path
        if isinstance(reference, str | Path) and image_suffix(reference) in NIFTI_SUFFIXES:
            import nibabel as nib

            ref_img = nib.load(str(reference))
        data = _nifti_bytes(array, affine, ref_img)
        if suffix == ".nii.gz":
            # compresslevel 1: nibabel's own default; mtime=0 makes output deterministic.
            data = gzip.compress(data, compresslevel=1, mtime=0)
        return atomic_write_bytes(path, data)
    if suffix in ITK_SUFFIXES:
        return _save_itk(path, _sitk_image(array, affine))
    raise DataError(f"{path}: cannot write this format (supported: {', '.join(SUPPORTED_SUFFIXES)})")


def _save_itk(path: Path, img: object) -> Path:
    """Write via SimpleITK into a temp dir of the destination folder, then rename.

    A MetaImage header (.mhd/.nhdr) names its raw data file, so the data file is renamed first
    and the header last: the header appears only when its data is complete.
    """
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        sitk.WriteImage(img, str(tmp), useCompression=True)
        for produced in sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name):
            os.replace(produced, path.parent / produced.name)
    except RuntimeError as error:
        raise DataError(f"{path}: cannot write image: {error}") from None
    finally:
        with contextlib.suppress(OSError):
            for leftover in tmp_dir.iterdir():
                leftover.unlink()
            tmp_dir.rmdir()
    return path


# ----------------------------------------------------------------------------------------------
# Orientation
# ----------------------------------------------------------------------------------------------
def axis_codes(affine: np.ndarray) -> str:
    """Closest axis codes of an affine, e.g. 'RAS', 'LPS'."""
    return "".join(nio.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def reorient_to_ras(
    array: np.ndarray, affine: np.ndarray, channel_first: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Permute/flip the spatial axes to the closest canonical RAS order (no resampling).

    Returns ``(array_ras, affine_ras, transform)``; ``transform`` is nibabel's (3, 2)
    orientation array of the *input* (``transform.tolist()`` is JSON-able) and is what
    :func:`reorient_from_ras` needs to restore the original voxel order. The spatial axes are
    the first three, or the last three with ``channel_first`` (the pipeline's (C, X, Y, Z)).
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nio.io_orientation(affine)
    spatial_shape = array.shape[1:4] if channel_first else array.shape[:3]
    moved = np.moveaxis(array, 0, -1) if channel_first else array
    out = nio.apply_orientation(moved, ornt)
    if channel_first:
        out = np.moveaxis(out, -1, 0)
    new_affine = affine @ nio.inv_ornt_aff(ornt, spatial_shape)
    return np.ascontiguousarray(out), new_affine, ornt.astype(np.int64)


def reorient_from_ras(
    array: np.ndarray,
    affine: np.ndarray,
    transform: np.ndarray | list[list[int]],
    channel_first: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inverse of :func:`reorient_to_ras`: back to the original voxel order and affine."""
    ornt = np.asarray(transform, dtype=np.float64)
    # Inverse orientation: RAS axis ornt[i, 0] goes back to input axis i with the same flip.
    inverse = np.zeros_like(ornt)
    for axis_in, (axis_out, flip) in enumerate(ornt):
        inverse[int(axis_out)] = (axis_in, flip)
    ras_shape = array.shape[1:4] if channel_first else array.shape[:3]
    moved = np.moveaxis(array, 0, -1) if channel_first else array
    out = nio.apply_orientation(moved, inverse)
    if channel_first:
        out = np.moveaxis(out, -1, 0)
    new_affine = np.asarray(affine, dtype=np.float64) @ nio.inv_ornt_aff(inverse, ras_shape)
    return np.ascontiguousarray(out), new_affine
