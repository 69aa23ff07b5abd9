"""Preprocessing of one case, and its exact inverse.

The forward path (``preprocess_image``), shared by ``hermes prepare`` and ``hermes predict``:

1. reorient to the closest canonical RAS voxel order (a permutation/flip, no interpolation);
2. crop to the bounding box of the BODY (CT: above an air threshold, MR/PET: non-zero), never
   to the labels: a label crop would tell the model where the answer is and cannot be done at
   prediction time;
3. resample the crop to the plan's target spacing (image trilinear, labels nearest);
4. normalise each channel with its modality family's scheme (``normalization.py``).

Cropping before resampling keeps the inverse exact in shape: ``restore_to_original`` resamples
back to the stored crop shape, pads the crop box back into the RAS grid, and undoes the
reorientation, so a prediction lands on the input's own voxel grid and affine.

Resampling maps the crop's field of view onto the new grid edge-to-edge (``align_corners=False``
in torch terms, as nnU-Net's shape-based resizing): the new shape is ``round(n * spacing /
target)`` and the effective spacing, stored in the meta, differs from the target by the
rounding only. Applying the same rule with the shapes swapped is the geometric inverse.
torch's trilinear interpolation is used over scipy's spline zoom because it is several times
faster on CPU and runs on the GPU at prediction time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hermes.data.imageio import Image, axis_codes, load_image, reorient_from_ras, reorient_to_ras, spacing_of
from hermes.data.normalization import ChannelNorm, body_mask, normalize_channel
from hermes.errors import DataError

ImageInput = Image | str | Path | Sequence[Image] | Sequence[str | Path]


@dataclass(frozen=True)
class PreprocessPlan:
    """Everything needed to preprocess an image of one dataset; stored in caches and models."""

    dataset: str
    modality: str
    target_spacing: tuple[float, float, float]
    channels: tuple[ChannelNorm, ...]
    crop_to_body: bool = True
    body_threshold_ct: float = -500.0
    image_dtype: str = "float32"

    @property
    def body_family(self) -> str:
        return self.channels[0].family

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "modality": self.modality,
            "target_spacing": [float(s) for s in self.target_spacing],
            "channels": [c.to_dict() for c in self.channels],
            "crop_to_body": self.crop_to_body,
            "body_threshold_ct": self.body_threshold_ct,
            "image_dtype": self.image_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessPlan:
        return cls(
            dataset=str(data["dataset"]),
            modality=str(data["modality"]),
            target_spacing=tuple(float(s) for s in data["target_spacing"]),  # type: ignore[arg-type]
            channels=tuple(ChannelNorm.from_dict(c) for c in data["channels"]),
            crop_to_body=bool(data.get("crop_to_body", True)),
            body_threshold_ct=float(data.get("body_threshold_ct", -500.0)),
            image_dtype=str(data.get("image_dtype", "float32")),
        )

    def digest(self) -> str:
        """Content hash: a cached case is reused only if it was made with an equal plan."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _as_images(image: ImageInput) -> list[Image]:
    if isinstance(image, Image):
        items: list[Image] = [image]
    elif isinstance(image, str | Path):
        items = [load_image(image)]
    else:
        items = [item if isinstance(item, Image) else load_image(item) for item in image]
    if not items:
        raise DataError("no image given")
    return items


def stack_channels(image: ImageInput) -> tuple[np.ndarray, np.ndarray, str]:
    """Load channel files into one float32 ``(C, X, Y, Z)`` array in file voxel order.

    All channels must share one grid: a channel on another grid would need registration,
    which is out of scope, and silently resampling it would hide a conversion error.
    """
    images = _as_images(image)
    arrays: list[np.ndarray] = []
    first = images[0]
    name = str(first.path) if first.path else "image"
    for item in images:
        where = str(item.path) if item.path else "image"
        array = np.asarray(item.array)
        if array.ndim == 3:
            arrays.append(array.astype(np.float32, copy=False))
        elif array.ndim == 4:
            arrays.extend(array[..., c].astype(np.float32, copy=False) for c in range(array.shape[3]))
        else:
            raise DataError(f"{where}: a {array.ndim}D array of shape {array.shape}; Hermes needs 3D volumes")
        if array.shape[:3] != first.array.shape[:3]:
            raise DataError(f"{where}: shape {array.shape[:3]} differs from {name} {first.array.shape[:3]}")
        if not np.allclose(item.affine, first.affine, atol=1e-3, rtol=1e-4):
            raise DataError(f"{where}: affine differs from {name}; channels must share one voxel grid")
    stacked = np.stack(arrays)
    if min(stacked.shape[1:]) < 2:
        raise DataError(f"{name}: a 2D image (shape {stacked.shape[1:]}); Hermes needs 3D volumes")
    if not np.isfinite(stacked).all():
        raise DataError(f"{name}: the image holds NaN or infinite values")
    return stacked, np.asarray(first.affine, dtype=np.float64), name


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target))  # type: ignore[return-value]


def _resize(array: np.ndarray | torch.Tensor, shape: Sequence[int], order: int) -> torch.Tensor:
    """Resize ``(C, X, Y, Z)`` edge-to-edge to ``shape``; order 0 nearest, 1 trilinear."""
    tensor = torch.as_tensor(array)
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    if order == 0:
        # 'nearest-exact' picks the voxel whose centre is nearest; plain 'nearest' is biased by
        # half a voxel, which would shift every label map.
        dtype = tensor.dtype
        out = F.interpolate(tensor[None].float(), size=tuple(shape), mode="nearest-exact")[0]
        return out.to(dtype)
    return F.interpolate(tensor[None].float(), size=tuple(shape), mode="trilinear", align_corners=False)[0]


def _crop_box(mask: np.ndarray) -> list[list[int]]:
    if not mask.any():
        return [[0, n] for n in mask.shape]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def _cache_affine(ras_affine: np.ndarray, box: list[list[int]], crop_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Voxel->world of the cache grid: cache voxel j sits at crop index (j + 0.5) * s - 0.5."""
    scale = np.array(crop_shape, dtype=np.float64) / np.array(new_shape, dtype=np.float64)
    to_crop = np.eye(4)
    to_crop[:3, :3] = np.diag(scale)
    to_crop[:3, 3] = 0.5 * scale - 0.5 + np.array([lo for lo, _ in box], dtype=np.float64)
    return ras_affine @ to_crop


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
def preprocess_image(image: ImageInput, plan: PreprocessPlan | dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Image (file path(s), :class:`Image` or list of channels) -> cache-space array and meta.

    Returns ``(array, meta)``: ``array`` is ``(C, X, Y, Z)`` in the plan's dtype; ``meta`` is a
    JSON-able dict with everything :func:`restore_to_original` and :func:`to_cache_space` need.
    Works on unlabelled images (prediction) exactly as on training cases.
    """
    plan = plan if isinstance(plan, PreprocessPlan) else PreprocessPlan.from_dict(plan)
    stacked, affine, name = stack_channels(image)
    if stacked.shape[0] != len(plan.channels):
        raise DataError(
            f"{name}: {stacked.shape[0]} channel(s), but dataset {plan.dataset!r} has {len(plan.channels)}"
        )
    for c in range(stacked.shape[0]):
        channel = stacked[c]
        if float(channel.max()) == float(channel.min()):
            raise DataError(f"{name}: channel {c} is constant ({float(channel.min())}); nothing to segment")
    ras, ras_affine, ornt = reorient_to_ras(stacked, affine, channel_first=True)
    spacing_ras = spacing_of(ras_affine)

    if plan.crop_to_body:
        mask = np.zeros(ras.shape[1:], dtype=bool)
        for c, norm in enumerate(plan.channels):
            mask |= body_mask(ras[c], norm.family, plan.body_threshold_ct)
        box = _crop_box(mask)
    else:
        box = [[0, n] for n in ras.shape[1:]]
    crop = ras[:, box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]]
    crop_shape = tuple(int(n) for n in crop.shape[1:])
    new_shape = resampled_shape(crop_shape, spacing_ras, plan.target_spacing)
    resampled = _resize(np.ascontiguousarray(crop), new_shape, order=1).numpy()

    out = np.empty(resampled.shape, dtype=np.float32)
    values: list[dict[str, float]] = []
    pad_values: list[float] = []
    for c, norm in enumerate(plan.channels):
        mask_c = body_mask(resampled[c], norm.family, plan.body_threshold_ct)
        out[c], used = normalize_channel(resampled[c], mask_c, norm)
        values.append(used)
        pad_values.append(float(out[c].min()))
    out = out.astype(np.dtype(plan.image_dtype), copy=False)

    cache_affine = _cache_affine(ras_affine, box, crop_shape, new_shape)
    meta = {
        "num_channels": int(stacked.shape[0]),
        "original_shape": [int(n) for n in stacked.shape[1:]],
        "original_affine": np.asarray(affine).tolist(),
        "original_axis_codes": axis_codes(affine),
        "orientation": np.asarray(ornt).tolist(),
        "ras_shape": [int(n) for n in ras.shape[1:]],
        "ras_affine": np.asarray(ras_affine).tolist(),
        "spacing_original": [float(s) for s in spacing_of(affine)],
        "spacing_ras": [float(s) for s in spacing_ras],
        "spacing_cache": [float(s) for s in spacing_of(cache_affine)],
        "crop_box": box,
        "cache_shape": [int(n) for n in new_shape],
        "cache_affine": cache_affine.tolist(),
        "normalization": values,
        "pad_value": pad_values,
        "plan_digest": plan.digest(),
    }
    return out, meta


def to_cache_space(array: np.ndarray, meta: dict[str, Any], order: int = 0) -> np.ndarray:
    """Bring an array on the original grid (e.g. a label map) into cache space, like its image."""
    array = np.asarray(array)
    channel_first = array.ndim == 4
    data = array if channel_first else array[None]
    if tuple(data.shape[1:]) != tuple(meta["original_shape"]):
        raise DataError(f"array of shape {tuple(data.shape[1:])} does not match the image shape {tuple(meta['original_shape'])}")
    ras, _, _ = reorient_to_ras(data, np.asarray(meta["original_affine"]), channel_first=True)
    box = meta["crop_box"]
    crop = np.ascontiguousarray(ras[:, box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]])
    out = _resize(crop, meta["cache_shape"], order).numpy()
    return out if channel_first else out[0]


def restore_to_original(
    array: np.ndarray | torch.Tensor, meta: dict[str, Any], order: int = 0, fill: float = 0.0
) -> np.ndarray:
    """Cache-space ``(X, Y, Z)`` or ``(C, X, Y, Z)`` array -> the original image grid.

    Inverse crop (outside the body box becomes ``fill``), inverse resampling to the exact crop
    shape (``order`` 0 nearest for label maps, 1 trilinear for probabilities/logits), inverse
    reorientation. The result has ``meta['original_shape']`` and belongs with
    ``meta['original_affine']``.
    """
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        array = np.array(array)  # e.g. a read-only memory map of the cache; torch needs writable
    tensor = torch.as_tensor(array)
    channel_first = tensor.ndim == 4
    data = tensor if channel_first else tensor[None]
    if list(data.shape[1:]) != list(meta["cache_shape"]):
        raise DataError(f"array of shape {tuple(data.shape[1:])} is not in this case's cache space {tuple(meta['cache_shape'])}")
    box = meta["crop_box"]
    crop_shape = [hi - lo for lo, hi in box]
    restored = _resize(data, crop_shape, order)
    if order != 0 and not torch.is_floating_point(tensor):
        restored = restored.float()
    restored_np = restored.detach().cpu().numpy()
    ras = np.full((restored_np.shape[0], *meta["ras_shape"]), fill, dtype=restored_np.dtype)
    ras[:, box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]] = restored_np
    out, _ = reorient_from_ras(ras, np.asarray(meta["ras_affine"]), meta["orientation"], channel_first=True)
    return out if channel_first else out[0]


# --------------------------------------------------------------------------------------------
# A labelled case
# --------------------------------------------------------------------------------------------
def check_label(label: Image, image_shape: Sequence[int], image_affine: np.ndarray, allowed: set[int]) -> np.ndarray:
    """Validate a label map against its image and dataset.json; returns integer values.

    Never "fixes" a label: an unknown value or a shifted grid means a conversion went wrong,
    and training on it would silently teach the wrong structure.
    """
    where = str(label.path) if label.path else "label"
    array = np.asarray(label.array)
    if array.ndim != 3:
        raise DataError(f"{where}: label must be a 3D map, got shape {array.shape}")
    if tuple(array.shape) != tuple(image_shape):
        raise DataError(f"{where}: label shape {array.shape} differs from the image shape {tuple(image_shape)}")
    if not np.allclose(label.affine, image_affine, atol=1e-3, rtol=1e-4):
        raise DataError(f"{where}: label affine differs from the image affine (not on the same voxel grid)")
    if np.issubdtype(array.dtype, np.floating) and (
        not np.isfinite(array).all() or not np.array_equal(array, np.round(array))
    ):
        raise DataError(f"{where}: label holds non-integer values")
    values = np.unique(array)
    unknown = sorted(int(v) for v in values if int(v) not in allowed)
    if unknown or (values.size and values.min() < 0):
        raise DataError(f"{where}: label values {unknown} are not in dataset.json labels {sorted(allowed)}")
    top = int(values.max()) if values.size else 0
    dtype = np.uint8 if top < 256 else np.uint16
    return array.astype(dtype)


def preprocess_case(
    image_paths: Sequence[str | Path], label_path: str | Path | None, plan: PreprocessPlan, allowed_labels: set[int]
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Preprocess an image and (optionally) its label map into cache space."""
    images = [load_image(p) for p in image_paths]
    array, meta = preprocess_image(images, plan)
    if label_path is None:
        return array, None, meta
    label = check_label(load_image(label_path), meta["original_shape"], np.asarray(meta["original_affine"]), allowed_labels)
    label_cache = to_cache_space(label, meta, order=0)
    return array, label_cache, meta
