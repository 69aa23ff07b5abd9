"""Per-case, per-task segmentation metrics in physical units: Dice, HD95 and NSD.

Surface metrics are MONAI's (``compute_hausdorff_distance``, ``compute_surface_dice``) with the
voxel spacing, so distances are millimetres on anisotropic grids. Before calling MONAI, both
masks are cropped to the bounding box of their union plus a zero margin: MONAI crops the same
way internally (``get_mask_edges(crop=True)``), but only after converting the *whole* volume to
float tensors, which for a 512x512x300 CT costs ~300 MB and seconds per task. The results are
identical (tests/test_metrics.py checks it).

Conventions (also in docs/inference_evaluation.md):

* HD95 is MONAI's symmetric percentile Hausdorff distance: the larger of the two directed 95th
  percentiles of boundary-voxel distances.
* NSD uses MONAI's sub-voxel surface areas (``use_subvoxels=True``), i.e. the DeepMind
  ``surface-distance`` definition, with a tolerance of ``nsd_tolerance_mm`` (default 2 mm).
* Reference and prediction both empty (a scan that lacks the structure, correctly left
  empty): Dice, NSD and HD95 are NaN and excluded from means, as in nnU-Net's evaluation, so
  numbers are comparable with nnU-Net's summary.json. The case is counted as a true negative.
* Exactly one of them empty: Dice 0, NSD 0 and HD95 = the diagonal of the image in mm (the
  largest distance possible in the volume), so misses and false positives are penalised in
  every mean instead of disappearing as NaN. A prediction on a scan whose reference lacks the
  structure is counted as a false-positive case (the reference code never penalised these).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from hermes.config import EvaluationConfig


@dataclass(frozen=True)
class MaskScores:
    """Scores of one predicted mask against its reference."""

    dice: float
    hd95: float
    nsd: float
    ref_voxels: int
    pred_voxels: int

    @property
    def ref_empty(self) -> bool:
        return self.ref_voxels == 0

    @property
    def false_positive_case(self) -> bool:
        """The reference lacks the structure but the prediction has some of it."""
        return self.ref_voxels == 0 and self.pred_voxels > 0

    @property
    def true_negative_case(self) -> bool:
        return self.ref_voxels == 0 and self.pred_voxels == 0

    def as_dict(self) -> dict[str, float | int | bool]:
        out: dict[str, float | int | bool] = asdict(self)
        out["ref_empty"] = self.ref_empty
        out["false_positive"] = self.false_positive_case
        return out


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image's diagonal in mm: the HD95 given to a missed or hallucinated mask."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (see the module conventions)."""
    pred_n = int(np.count_nonzero(pred))
    ref_n = int(np.count_nonzero(ref))
    if pred_n + ref_n == 0:
        return float("nan")
    overlap = int(np.count_nonzero(np.logical_and(pred, ref)))
    return 2.0 * overlap / (pred_n + ref_n)


def union_crop(pred: np.ndarray, ref: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union, with ``margin`` voxels of zeros
    around it (padding past the image border, as MONAI's own crop does), so surface voxels on
    the image border stay surface voxels."""
    union = np.logical_or(pred, ref)
    coords = [np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
              for axis in range(union.ndim)]
    out = []
    for mask in (pred, ref):
        sl = tuple(slice(int(c[0]), int(c[-1]) + 1) for c in coords)
        out.append(np.pad(mask[sl], margin, mode="constant", constant_values=False))
    return out[0], out[1]


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def surface_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
    hd_percentile: float = 95.0,
) -> tuple[float, float]:
    """(HD95 mm, NSD) of two non-empty boolean masks via MONAI, on their union's bounding box."""
    pred_c, ref_c = union_crop(pred, ref)
    yp, yt = _as_batch(pred_c), _as_batch(ref_c)
    spacing_list = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks; callers never pass them
        hd = compute_hausdorff_distance(
            yp, yt, include_background=True, percentile=hd_percentile, spacing=spacing_list
        )
        nsd = compute_surface_dice(
            yp,
            yt,
            class_thresholds=[float(nsd_tolerance_mm)],
            include_background=True,
            spacing=spacing_list,
            use_subvoxels=True,
        )
    return float(hd.item()), float(nsd.item())


def score_masks(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    config: EvaluationConfig | None = None,
) -> MaskScores:
    """Dice, HD95 and NSD of one predicted mask against its reference on the same grid."""
    config = config or EvaluationConfig()
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}D mask")
    pred_n = int(np.count_nonzero(pred))
    ref_n = int(np.count_nonzero(ref))
    if pred_n == 0 and ref_n == 0:
        nan = float("nan")
        return MaskScores(nan, nan, nan, 0, 0)
    if pred_n == 0 or ref_n == 0:
        return MaskScores(0.0, image_diagonal_mm(ref.shape, spacing), 0.0, ref_n, pred_n)
    hd95, nsd = surface_metrics(pred, ref, spacing, config.nsd_tolerance_mm, config.hd_percentile)
    return MaskScores(dice(pred, ref), hd95, nsd, ref_n, pred_n)
