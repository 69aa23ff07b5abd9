"""Training-time augmentation: one resampling for all spatial transforms, then intensity.

Spatial: rotation about each axis, isotropic scaling, optional elastic deformation and
mirroring are composed into one coordinate map and applied with a single ``grid_sample``
that reads its input *directly from the memory-mapped volume* (only the region the rotated
patch touches is copied). The image is interpolated trilinearly, the label map with nearest
neighbour, so label values stay exactly the stored ones. MONAI's ``RandAffined`` needs the
larger crop materialised first and resamples image and label separately; the measured
comparison is in docs/bench/data.md.

Intensity (each with a per-modality-family probability, ``AugmentConfig.intensity_prob``):
Gaussian noise, Gaussian blur, brightness (multiplicative), contrast (range kept), simulated
low resolution (nearest down, trilinear up), gamma (mean and std kept), as in nnU-Net.

All randomness comes from a ``numpy.random.Generator`` passed in: given the same generator
state the output is bit-identical, which is what makes batches reproducible from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hermes.config import AugmentConfig

INTENSITY_OPS = ("noise", "blur", "brightness", "contrast", "low_resolution", "gamma")


@dataclass(frozen=True)
class SpatialDraw:
    """A sampled spatial transform: output offset (voxels) -> input offset = matrix @ offset."""

    matrix: np.ndarray  # (3, 3)
    elastic: np.ndarray | None = None  # (3, g, g, g) coarse displacement field, voxels

    @property
    def is_identity(self) -> bool:
        return self.elastic is None and np.allclose(self.matrix, np.eye(3))


def _rotation(angles: Sequence[float]) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_spatial(rng: np.random.Generator, config: AugmentConfig) -> SpatialDraw:
    """Sample rotation/scale (with ``spatial_prob``), elastic and per-axis mirroring.

    Scale s > 1 samples a larger field of view (zoom out), s < 1 zooms in. Mirroring is drawn
    independently of ``spatial_prob`` (p = 0.5 per configured axis), as in nnU-Net.
    """
    matrix = np.eye(3)
    elastic = None
    if config.enabled:
        if rng.random() < config.spatial_prob:
            limit = math.radians(config.rotation_deg)
            angles = rng.uniform(-limit, limit, size=3)
            scale = rng.uniform(*config.scale_range)
            matrix = _rotation(angles) * scale
            if config.elastic:
                grid = config.elastic_grid
                magnitude = rng.uniform(*config.elastic_magnitude)
                elastic = rng.normal(0.0, 1.0, size=(3, grid, grid, grid)) * magnitude
        flips = np.ones(3)
        for axis in config.mirror_axes:
            if rng.random() < 0.5:
                flips[axis] = -1.0
        matrix = matrix @ np.diag(flips)
    return SpatialDraw(matrix=matrix, elastic=elastic)


def _read_region(volume: np.ndarray, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """``volume[..., lo:hi]`` for a box that may stick out of the volume (outside -> missing)."""
    return np.asarray(volume[(..., *(slice(a, b) for a, b in zip(lo, hi)))])


def extract_patch(
    image: np.ndarray,
    label: np.ndarray | None,
    center: Sequence[float],
    patch_size: Sequence[int],
    spatial: SpatialDraw | None = None,
    pad_value: Sequence[float] | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A patch centred at ``center`` (voxel coordinates) of a ``(C, X, Y, Z)`` volume.

    Parts outside the volume are filled with ``pad_value`` (per channel; the case's
    background intensity) and label 0. Returns ``image (C, *patch)`` float32 and
    ``label (*patch)`` int64 (or None).
    """
    shape = np.array(image.shape[1:])
    patch = np.array(patch_size)
    channels = image.shape[0]
    pad = torch.as_tensor(np.broadcast_to(np.asarray(pad_value, dtype=np.float32), (channels,)).copy())
    if spatial is None or spatial.is_identity:
        start = np.floor(np.asarray(center) - patch / 2.0 + 0.5).astype(int)
        lo = np.clip(start, 0, shape)
        hi = np.clip(start + patch, 0, shape)
        img = torch.empty((channels, *patch), dtype=torch.float32)
        img[:] = pad.view(-1, 1, 1, 1)
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        img[(slice(None), *dst)] = torch.from_numpy(_read_region(image, lo, hi).astype(np.float32))
        lab = None
        if label is not None:
            lab = torch.zeros(tuple(patch), dtype=torch.int64)
            lab[dst] = torch.from_numpy(_read_region(label, lo, hi).astype(np.int64))
        return img, lab

    # Output voxel k sits at offset k - (p - 1) / 2 from the centre; map offsets to input.
    axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0 for n in patch]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, *patch)
    coords = torch.einsum("ij,j...->i...", torch.as_tensor(spatial.matrix, dtype=torch.float32), offsets)
    if spatial.elastic is not None:
        field = torch.as_tensor(spatial.elastic, dtype=torch.float32)[None]
        coords = coords + F.interpolate(field, size=tuple(patch), mode="trilinear", align_corners=True)[0]
    coords = coords + torch.as_tensor(np.asarray(center, dtype=np.float32)).view(3, 1, 1, 1)
    lo = np.clip(np.floor(coords.flatten(1).min(1).values.numpy()).astype(int) - 1, 0, shape)
    hi = np.clip(np.ceil(coords.flatten(1).max(1).values.numpy()).astype(int) + 2, 0, shape)
    img = torch.empty((channels, *patch), dtype=torch.float32)
    img[:] = pad.view(-1, 1, 1, 1)
    if np.any(hi - lo < 1):  # the transformed patch misses the volume entirely
        lab = torch.zeros(tuple(patch), dtype=torch.int64) if label is not None else None
        return img, lab
    size = hi - lo
    # grid_sample's normalised coordinates (align_corners=True): -1 and 1 are the first and
    # last voxel centres of the region; its last axis orders (z, y, x) for a (X, Y, Z) input.
    norm = (coords - torch.as_tensor(lo, dtype=torch.float32).view(3, 1, 1, 1)) / torch.as_tensor(
        np.maximum(size - 1, 1), dtype=torch.float32
    ).view(3, 1, 1, 1) * 2.0 - 1.0
    grid = norm.flip(0).permute(1, 2, 3, 0)[None].float()  # (1, *patch, 3)
    region = torch.from_numpy(_read_region(image, lo, hi).astype(np.float32))
    # Zero padding of grid_sample + shifting by the pad value = padding with the pad value.
    shifted = (region - pad.view(-1, 1, 1, 1))[None]
    img = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    img = img + pad.view(-1, 1, 1, 1)
    lab = None
    if label is not None:
        region_label = torch.from_numpy(_read_region(label, lo, hi).astype(np.float32))[None, None]
        lab = F.grid_sample(region_label, grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
        lab = lab.round().to(torch.int64)
    return img, lab


# --------------------------------------------------------------------------------------------
# Intensity
# --------------------------------------------------------------------------------------------
def intensity_probability(config: AugmentConfig, family: str) -> float:
    return float(config.intensity_prob.get(family, config.intensity_prob.get("default", 0.0)))


def draw_intensity(rng: np.random.Generator, config: AugmentConfig, family: str) -> list[tuple[str, float]]:
    """Which intensity transforms apply to one sample, with their sampled parameter."""
    if not config.enabled:
        return []
    p = intensity_probability(config, family)
    ranges = {
        "noise": config.noise_std,
        "blur": config.blur_sigma,
        "brightness": config.brightness,
        "contrast": config.contrast,
        "low_resolution": config.low_resolution,
        "gamma": config.gamma,
    }
    ops = []
    for name in INTENSITY_OPS:
        apply = rng.random() < p
        value = float(rng.uniform(*ranges[name]))  # always drawn: keeps the stream aligned
        if apply:
            ops.append((name, value))
    return ops


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = x[:, None]  # (C, 1, X, Y, Z)
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(F.pad(out, _pad_arg(padding), mode="replicate"), kernel.view(shape))
    return out[:, 0]


def _pad_arg(padding: list[int]) -> tuple[int, ...]:
    # F.pad takes (last-dim-left, last-dim-right, ...), i.e. Z first.
    return (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0])


def apply_intensity(image: torch.Tensor, ops: list[tuple[str, float]], seed: int) -> torch.Tensor:
    """Apply the drawn transforms to a ``(C, X, Y, Z)`` patch; ``seed`` drives the noise."""
    x = image
    for name, value in ops:
        if name == "noise":
            generator = torch.Generator().manual_seed(seed)
            x = x + value * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        elif name == "blur":
            x = _gaussian_blur(x, value)
        elif name == "brightness":
            x = x * value
        elif name == "contrast":
            dims = (1, 2, 3)
            mean = x.mean(dim=dims, keepdim=True)
            lo = x.amin(dim=dims, keepdim=True)
            hi = x.amax(dim=dims, keepdim=True)
            x = torch.minimum(torch.maximum((x - mean) * value + mean, lo), hi)
        elif name == "low_resolution":
            size = [max(1, round(n / value)) for n in x.shape[1:]]
            small = F.interpolate(x[None], size=size, mode="nearest-exact")
            x = F.interpolate(small, size=tuple(x.shape[1:]), mode="trilinear", align_corners=False)[0]
        elif name == "gamma":
            dims = (1, 2, 3)
            mean = x.mean(dim=dims, keepdim=True)
            std = x.std(dim=dims, keepdim=True)
            lo = x.amin(dim=dims, keepdim=True)
            span = (x.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-7)
            y = ((x - lo) / span).clamp(0, 1) ** value * span + lo
            y_std = y.std(dim=dims, keepdim=True).clamp_min(1e-7)
            x = (y - y.mean(dim=dims, keepdim=True)) / y_std * std + mean
        else:  # pragma: no cover - names come from INTENSITY_OPS
            raise ValueError(name)
    return x


def augment_patch(
    rng: np.random.Generator,
    config: AugmentConfig,
    family: str,
    image: np.ndarray,
    label: np.ndarray | None,
    center: Sequence[float],
    patch_size: Sequence[int],
    pad_value: Sequence[float] | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Spatial then intensity augmentation of one patch (the sampler's single entry point)."""
    spatial = draw_spatial(rng, config)
    img, lab = extract_patch(image, label, center, patch_size, spatial, pad_value)
    ops = draw_intensity(rng, config, family)
    if ops:
        img = apply_intensity(img, ops, int(rng.integers(0, 2**62)))
    return img, lab
