"""Metrics against hand-made masks with known answers (incl. empty masks, anisotropic spacing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from hermes.config import EvaluationConfig
from hermes.evaluation.metrics import dice, image_diagonal_mm, score_masks, union_crop


def _cube(shape: tuple[int, int, int], lo: tuple[int, int, int], size: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return mask


def _set_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Independent Dice: sets of voxel coordinates."""
    p = set(map(tuple, np.argwhere(pred)))
    r = set(map(tuple, np.argwhere(ref)))
    return 2 * len(p & r) / (len(p) + len(r))


def test_dice_known_answer_and_independent_implementation() -> None:
    ref = _cube((20, 20, 20), (2, 2, 2), 10)  # 1000 voxels
    pred = _cube((20, 20, 20), (4, 2, 2), 10)  # shifted by 2 along x: overlap 800
    assert dice(pred, ref) == pytest.approx(0.8)
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.random((12, 9, 7)) > 0.6
        b = rng.random((12, 9, 7)) > 0.5
        assert dice(a, b) == pytest.approx(_set_dice(a, b))


def test_single_voxels_give_exact_physical_distances_on_anisotropic_grid() -> None:
    pred = np.zeros((10, 10, 10), dtype=bool)
    ref = np.zeros_like(pred)
    pred[5, 5, 2] = True
    ref[5, 5, 4] = True  # 2 voxels apart along z
    spacing = (0.7, 0.7, 3.0)
    scores = score_masks(pred, ref, spacing, EvaluationConfig(nsd_tolerance_mm=2.0))
    assert scores.dice == 0.0
    assert scores.hd95 == pytest.approx(6.0)
    assert scores.nsd == 0.0  # every boundary point is 6 mm away, beyond 2 mm
    tolerant = score_masks(pred, ref, spacing, EvaluationConfig(nsd_tolerance_mm=6.5))
    assert tolerant.nsd == pytest.approx(1.0)


@pytest.mark.parametrize(("axis", "spacing", "expected"), [(0, (0.5, 1.0, 1.0), 1.0), (2, (1.0, 1.0, 2.5), 5.0)])
def test_shifted_cube_hausdorff_is_shift_in_mm(axis: int, spacing: tuple[float, ...], expected: float) -> None:
    lo = [4, 4, 4]
    ref = _cube((24, 24, 24), tuple(lo), 10)  # type: ignore[arg-type]
    lo[axis] += 2
    pred = _cube((24, 24, 24), tuple(lo), 10)  # type: ignore[arg-type]
    full = score_masks(pred, ref, spacing, EvaluationConfig(hd_percentile=100.0))
    assert full.hd95 == pytest.approx(expected)
    p95 = score_masks(pred, ref, spacing)
    assert 0.0 < p95.hd95 <= expected + 1e-6
    # A tolerance covering the whole shift makes every boundary element "correct".
    assert score_masks(pred, ref, spacing, EvaluationConfig(nsd_tolerance_mm=expected + 0.01)).nsd == pytest.approx(1.0)
    assert full.dice == pytest.approx(0.8)


def test_identical_masks_are_perfect() -> None:
    ref = _cube((16, 16, 16), (3, 3, 3), 6)
    scores = score_masks(ref.copy(), ref, (1.0, 2.0, 3.0))
    assert (scores.dice, scores.hd95, scores.nsd) == (1.0, 0.0, 1.0)


def test_empty_conventions() -> None:
    shape, spacing = (8, 10, 12), (1.0, 2.0, 0.5)
    empty = np.zeros(shape, dtype=bool)
    some = _cube(shape, (1, 1, 1), 3)
    both = score_masks(empty, empty, spacing)
    assert math.isnan(both.dice) and math.isnan(both.hd95) and math.isnan(both.nsd)
    assert both.true_negative_case and not both.false_positive_case
    diagonal = math.sqrt(8**2 + 20**2 + 6**2)
    assert image_diagonal_mm(shape, spacing) == pytest.approx(diagonal)
    fp = score_masks(some, empty, spacing)  # structure absent from the scan, predicted anyway
    assert (fp.dice, fp.nsd, fp.hd95) == (0.0, 0.0, pytest.approx(diagonal))
    assert fp.false_positive_case and fp.ref_empty
    miss = score_masks(empty, some, spacing)
    assert (miss.dice, miss.nsd, miss.hd95) == (0.0, 0.0, pytest.approx(diagonal))
    assert not miss.false_positive_case


def test_cropping_matches_monai_on_the_full_volume() -> None:
    """Our union-box crop is only a speed-up: same numbers as MONAI on the uncropped arrays,
    including masks touching the image border."""
    rng = np.random.default_rng(1)
    ref = np.zeros((30, 26, 20), dtype=bool)
    ref[0:12, 5:20, 3:15] = True  # touches the x=0 border
    pred = ref.copy()
    pred[rng.random(ref.shape) > 0.93] ^= True
    spacing = (0.8, 1.1, 2.5)
    ours = score_masks(pred, ref, spacing)
    yp = torch.from_numpy(pred.astype(np.float32))[None, None]
    yt = torch.from_numpy(ref.astype(np.float32))[None, None]
    hd = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=list(spacing))
    nsd = compute_surface_dice(yp, yt, [2.0], include_background=True, spacing=list(spacing), use_subvoxels=True)
    assert ours.hd95 == pytest.approx(float(hd.item()), rel=1e-6)
    assert ours.nsd == pytest.approx(float(nsd.item()), rel=1e-6)
    a, b = union_crop(pred, ref)
    assert a.shape == b.shape and a.sum() == pred.sum() and b.sum() == ref.sum()


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        score_masks(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
