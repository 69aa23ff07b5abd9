"""Intensity normalisation: one small named scheme per modality family (ct, mr, pet).

Like nnU-Net's ``default_normalization_schemes.py``, a scheme is chosen per image channel from
its modality family. Decisions (also in docs/data.md):

* **ct**: clip to the HU window, then z-score with statistics pooled over the body voxels of
  every training case of every CT channel in the catalog. Pooling per *modality* rather than
  per dataset keeps one HU value at one normalised value in every CT dataset (a universal
  model sees the same liver intensity whatever dataset the scan came from), and `hermes
  predict` needs no dataset to normalise a new CT.
* **mr** (and unknown sequences): MR intensities have no physical unit, so each volume is
  normalised on its own: clip to its percentiles (of the body voxels), then z-score over the
  volume (or only the body when ``mr_zscore_in_body``).
* **pet**: divide by a per-volume SUV-like scale (a high percentile of the body) and log1p,
  which compresses the heavy-tailed uptake of hot lesions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FAMILIES = ("ct", "mr", "pet")


@dataclass(frozen=True)
class ChannelNorm:
    """How one channel is normalised. ``mean``/``std`` are only used by the ct scheme."""

    family: str
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    ct_mean: float = 0.0
    ct_std: float = 1.0
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    mr_zscore_in_body: bool = False
    pet_percentile: float = 99.5

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"family": self.family}
        if self.family == "ct":
            data.update(ct_window=list(self.ct_window), ct_mean=self.ct_mean, ct_std=self.ct_std)
        elif self.family == "pet":
            data.update(pet_percentile=self.pet_percentile)
        else:
            data.update(mr_percentiles=list(self.mr_percentiles), mr_zscore_in_body=self.mr_zscore_in_body)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelNorm:
        kwargs = dict(data)
        for key in ("ct_window", "mr_percentiles"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)


def body_mask(channel: np.ndarray, family: str, ct_threshold: float) -> np.ndarray:
    """Voxels belonging to the patient: above the air threshold for CT, above the minimum else.

    MR/PET scanners and converters write one constant outside the field of view or the
    skull-stripped brain: zero for raw data (nnU-Net's non-zero crop relies on it), or the
    lowest value once a converter has z-scored the volume (BraTS). "Above the minimum" covers
    both; a volume with noise everywhere keeps its full extent, as with nnU-Net.
    """
    if family == "ct":
        return channel > ct_threshold
    return channel > channel.min()


def ct_statistics(channel: np.ndarray, mask: np.ndarray, window: tuple[float, float]) -> dict[str, float]:
    """Sufficient statistics (count, sum, sum of squares) of the clipped body voxels.

    Kept as sums so that statistics of many cases pool exactly, without holding voxels.
    """
    values = np.clip(channel[mask].astype(np.float64), window[0], window[1])
    return {"count": float(values.size), "sum": float(values.sum()), "sumsq": float(np.square(values).sum())}


def pool_ct_statistics(stats: list[dict[str, float]], window: tuple[float, float]) -> tuple[float, float]:
    """Mean and std from pooled sums; the window's centre/half-width when there is no data."""
    count = sum(item["count"] for item in stats)
    if count < 2:
        return (window[0] + window[1]) / 2.0, (window[1] - window[0]) / 2.0
    mean = sum(item["sum"] for item in stats) / count
    var = max(sum(item["sumsq"] for item in stats) / count - mean * mean, 0.0)
    return float(mean), float(max(np.sqrt(var), 1e-3))


def normalize_channel(channel: np.ndarray, mask: np.ndarray, norm: ChannelNorm) -> tuple[np.ndarray, dict[str, float]]:
    """Normalise one channel (float32 in, float32 out); returns the per-volume values used."""
    x = channel.astype(np.float32, copy=False)
    body = x[mask] if mask.any() else x.ravel()
    if norm.family == "ct":
        lo, hi = norm.ct_window
        out = (np.clip(x, lo, hi) - np.float32(norm.ct_mean)) / np.float32(norm.ct_std)
        return out.astype(np.float32, copy=False), {"mean": norm.ct_mean, "std": norm.ct_std}
    if norm.family == "pet":
        scale = float(np.percentile(body, norm.pet_percentile))
        if scale <= 0:
            scale = float(np.abs(body).max()) or 1.0
        out = np.log1p(np.clip(x, 0.0, None) / np.float32(scale))
        return out.astype(np.float32, copy=False), {"scale": scale}
    lo, hi = (float(v) for v in np.percentile(body, norm.mr_percentiles))
    clipped = np.clip(x, lo, hi)
    ref = clipped[mask] if norm.mr_zscore_in_body and mask.any() else clipped
    mean = float(ref.mean(dtype=np.float64))
    std = float(ref.std(dtype=np.float64))
    std = std if std > 1e-8 else 1.0
    out = (clipped - np.float32(mean)) / np.float32(std)
    return out.astype(np.float32, copy=False), {"clip_low": lo, "clip_high": hi, "mean": mean, "std": std}
