"""Image IO: formats, RAS geometry (incl. SimpleITK's LPS), atomic/deterministic writes, errors."""

from __future__ import annotations

import gzip
import itertools
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from hermes.data.imageio import (
    axis_codes,
    load_header,
    load_image,
    reorient_from_ras,
    reorient_to_ras,
    save_image,
)
from hermes.errors import DataError


def _affine(codes: str = "LPS", spacing=(0.8, 1.2, 2.5), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """An affine whose voxel axes point along `codes` (permutations allowed), with an origin."""
    vectors = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
    affine = np.eye(4)
    for axis, (code, size) in enumerate(zip(codes, spacing)):
        affine[:3, axis] = np.asarray(vectors[code], dtype=float) * size
    affine[:3, 3] = origin
    return affine


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_roundtrip_keeps_array_and_affine(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = _affine("LAS")
    path = save_image(tmp_path / f"img{suffix}", array, affine)
    image = load_image(path)
    np.testing.assert_array_equal(image.array, array)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert image.spacing == pytest.approx((0.8, 1.2, 2.5), abs=1e-6)
    header = load_header(path)
    assert header.shape == (5, 6, 7)
    np.testing.assert_allclose(header.affine, affine, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_itk_lps_conversion_matches_nibabel(tmp_path: Path) -> None:
    """SimpleITK's own NIfTI->NRRD conversion must give the affine nibabel reads from the NIfTI."""
    affine = _affine("PSL", spacing=(1.5, 0.7, 3.0))
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), affine), tmp_path / "a.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "a.nii.gz")), str(tmp_path / "a.nrrd"))
    nifti, nrrd = load_image(tmp_path / "a.nii.gz"), load_image(tmp_path / "a.nrrd")
    np.testing.assert_allclose(nrrd.affine, nifti.affine, atol=1e-5)
    np.testing.assert_array_equal(nrrd.array, nifti.array)
    assert axis_codes(nrrd.affine) == "PSL"


def test_nifti_gzip_is_byte_deterministic(tmp_path: Path) -> None:
    labels = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 3).astype(np.uint8)
    a = save_image(tmp_path / "a.nii.gz", labels, _affine()).read_bytes()
    b = save_image(tmp_path / "b.nii.gz", labels, _affine()).read_bytes()
    assert a == b
    assert gzip.decompress(a)  # a valid gzip stream


def test_save_with_reference_keeps_label_dtype(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), tmp_path / "ref.nii.gz")
    out = save_image(tmp_path / "lab.nii.gz", np.ones((3, 3, 3), np.uint8), np.eye(4), reference=tmp_path / "ref.nii.gz")
    assert load_image(out).array.dtype == np.uint8
    again = save_image(tmp_path / "lab2.nii.gz", np.ones((3, 3, 3), np.int64), np.eye(4), reference=load_image(out))
    assert load_image(again).array.dtype == np.int32  # int64 is narrowed for NIfTI readers


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PSL", "IRA", "SLP"])
def test_reorient_roundtrip_preserves_world_positions(codes: str) -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    affine = _affine(codes, spacing=(1.0, 2.0, 3.0))
    ras, ras_affine, transform = reorient_to_ras(array, affine)
    assert axis_codes(ras_affine) == "RAS"
    for index in itertools.product(*(range(s) for s in array.shape)):
        value = array[index]
        ras_index = np.argwhere(ras == value)[0]
        world = affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras_affine @ np.array([*ras_index, 1.0]), world)
    back, back_affine = reorient_from_ras(ras, ras_affine, transform.tolist())
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(back_affine, affine)
    # channel-first arrays (the pipeline's (C, X, Y, Z)) reorient their last three axes.
    stacked = np.stack([array, array + 100])
    ras_c, _, t_c = reorient_to_ras(stacked, affine, channel_first=True)
    np.testing.assert_array_equal(ras_c[1], ras + 100)
    np.testing.assert_array_equal(reorient_from_ras(ras_c, ras_affine, t_c, channel_first=True)[0], stacked)


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.nii.gz")
    save_image(tmp_path / "good.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
    noisy = save_image(tmp_path / "noisy.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)), np.eye(4))
    for keep in (60, len(noisy.read_bytes()) // 2):  # inside the header / inside the voxels
        truncated = tmp_path / "truncated.nii.gz"
        truncated.write_bytes(noisy.read_bytes()[:keep])
        with pytest.raises(DataError, match=re.escape("truncated.nii.gz")):
            load_image(truncated)
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=re.escape("garbage.nrrd")):
        load_image(garbage)
    with pytest.raises(DataError, match="2D"):
        load_image(save_image(tmp_path / "flat.nii.gz", np.zeros((8, 8, 1), np.float32), np.eye(4)))
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        load_image(save_image(tmp_path / "nan.nii.gz", nan, np.eye(4)))
    (tmp_path / "good.nii.gz.bak").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported"):
        load_image(tmp_path / "good.nii.gz.bak")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="DICOM"):
        load_image(tmp_path / "empty_dir")


@pytest.mark.realmini
def test_dicom_series_matches_its_label_in_physical_space(realmini_root: Path) -> None:
    folder = realmini_root / "dicom_ct_example"
    ct = load_image(folder / "dicom")
    label = load_image(folder / "label.nii.gz")
    assert ct.array.shape == (512, 512, 20)
    assert ct.spacing == pytest.approx((0.9766, 0.9766, 2.0), abs=1e-3)
    # The label grid is flipped along A-P relative to the DICOM rows: compare in RAS.
    ct_ras, ct_affine, _ = reorient_to_ras(ct.array, ct.affine)
    label_ras, label_affine, _ = reorient_to_ras(label.array, label.affine)
    np.testing.assert_allclose(ct_affine, label_affine, atol=1e-3)
    liver_hu = float(np.median(ct_ras[label_ras == 1]))
    assert 30 < liver_hu < 120, liver_hu  # soft tissue: the label lies on the liver
    # ... and the same voxels as the NIfTI conversion shipped in Dataset505.
    nifti = load_image(realmini_root / "Dataset505_TotalSegCT/imagesTs/totalseg_example_ct_dicom_0000.nii.gz")
    nifti_ras, nifti_affine, _ = reorient_to_ras(nifti.array, nifti.affine)
    np.testing.assert_allclose(nifti_affine, ct_affine, atol=1e-3)
    np.testing.assert_array_equal(nifti_ras, ct_ras)
