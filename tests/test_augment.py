"""Augmentation: valid labels, geometry of the one-grid_sample affine, probabilities, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hermes.config import AugmentConfig
from hermes.data.augment import (
    INTENSITY_OPS,
    SpatialDraw,
    _rotation,
    apply_intensity,
    augment_patch,
    draw_intensity,
    draw_spatial,
    extract_patch,
)


def volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.zeros((40, 36, 32), np.uint8)
    label[8:30, 6:20, 5:25] = 3
    label[15:22, 22:30, 10:20] = 7
    image = (label * 10.0 + rng.normal(0, 1, label.shape)).astype(np.float32)[None]
    return image, label


def test_identity_transform_equals_plain_crop() -> None:
    image, label = volume()
    center = (20.0, 17.5, 15.5)
    crop_img, crop_lab = extract_patch(image, label, center, (16, 16, 16))
    warp_img, warp_lab = extract_patch(
        image, label, center, (16, 16, 16), SpatialDraw(np.eye(3) * (1 + 1e-9))
    )
    assert torch.equal(crop_lab, warp_lab)
    assert torch.allclose(crop_img, warp_img, atol=1e-4)
    assert torch.equal(crop_img, torch.from_numpy(image[:, 12:28, 10:26, 8:24]))


def test_rotation_and_mirror_geometry() -> None:
    image, label = volume()
    center = (19.5, 17.5, 15.5)
    _, plain = extract_patch(image, label, center, (24, 24, 24))
    quarter = SpatialDraw(_rotation((0.0, 0.0, math.pi / 2)))  # 90 degrees about z: exact
    _, rotated = extract_patch(image, label, center, (24, 24, 24), quarter)
    assert torch.equal(rotated, torch.rot90(plain, k=1, dims=(1, 0)))
    _, mirrored = extract_patch(image, label, center, (24, 24, 24), SpatialDraw(np.diag([-1.0, 1.0, 1.0])))
    assert torch.equal(mirrored, torch.flip(plain, dims=(0,)))


@pytest.mark.parametrize("elastic", [False, True])
def test_labels_stay_valid_and_pad_value(elastic: bool) -> None:
    image, label = volume()
    config = AugmentConfig(spatial_prob=1.0, rotation_deg=30, scale_range=(0.7, 1.4), elastic=elastic, mirror_axes=[0, 1, 2])
    for seed in range(10):
        rng = np.random.default_rng(seed)
        img, lab = augment_patch(rng, config, "ct", image, label, (5.0, 30.0, 16.0), (24, 24, 24), pad_value=-3.0)
        assert set(torch.unique(lab).tolist()) <= {0, 3, 7}  # nearest: only stored values
        assert img.shape == (1, 24, 24, 24) and torch.isfinite(img).all()
    # Far outside the volume everything is padding: pad value and background.
    img, lab = extract_patch(image, label, (-100.0, 0.0, 0.0), (8, 8, 8), SpatialDraw(_rotation((0.3, 0.2, 0.1))), -3.0)
    assert torch.all(img == -3.0) and torch.all(lab == 0)


def test_deterministic_under_seed() -> None:
    image, label = volume()
    config = AugmentConfig(spatial_prob=1.0, elastic=True, intensity_prob={"default": 1.0})
    a = augment_patch(np.random.default_rng(5), config, "mr", image, label, (20.0, 18.0, 16.0), (16, 16, 16))
    b = augment_patch(np.random.default_rng(5), config, "mr", image, label, (20.0, 18.0, 16.0), (16, 16, 16))
    c = augment_patch(np.random.default_rng(6), config, "mr", image, label, (20.0, 18.0, 16.0), (16, 16, 16))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_probabilities_respected_per_family() -> None:
    config = AugmentConfig(spatial_prob=0.3, intensity_prob={"default": 0.1, "mr": 0.4}, mirror_axes=[0])
    rng = np.random.default_rng(0)
    n = 4000
    counts = {family: dict.fromkeys(INTENSITY_OPS, 0) for family in ("ct", "mr")}
    for family in counts:
        for _ in range(n):
            for name, _value in draw_intensity(rng, config, family):
                counts[family][name] += 1
    for name in INTENSITY_OPS:
        assert counts["ct"][name] / n == pytest.approx(0.1, abs=0.02)
        assert counts["mr"][name] / n == pytest.approx(0.4, abs=0.03)
    draws = [draw_spatial(rng, config) for _ in range(n)]
    rotated = np.mean([not np.allclose(np.abs(d.matrix), np.eye(3)) for d in draws])
    mirrored = np.mean([d.matrix[0, 0] < 0 for d in draws if np.allclose(np.abs(d.matrix), np.eye(3))])
    assert rotated == pytest.approx(0.3, abs=0.03) and mirrored == pytest.approx(0.5, abs=0.04)
    assert draw_intensity(rng, AugmentConfig(enabled=False), "mr") == []


def test_intensity_ops_behave() -> None:
    x = torch.linspace(0, 1, 16**3).reshape(1, 16, 16, 16) + 0.5
    assert torch.allclose(apply_intensity(x, [("brightness", 2.0)], 0), 2 * x)
    gamma = apply_intensity(x, [("gamma", 1.5)], 0)
    assert torch.allclose(gamma.mean(), x.mean(), atol=1e-4) and torch.allclose(gamma.std(), x.std(), atol=1e-4)
    contrast = apply_intensity(x, [("contrast", 1.5)], 0)
    assert contrast.min() >= x.min() and contrast.max() <= x.max()
    blurred = apply_intensity(torch.rand(1, 16, 16, 16), [("blur", 1.0)], 0)
    assert blurred.std() < 0.2  # uniform noise has std 0.29
    noisy = apply_intensity(x, [("noise", 0.1)], 7)
    assert torch.equal(noisy, apply_intensity(x, [("noise", 0.1)], 7)) and (noisy - x).std() == pytest.approx(0.1, abs=0.01)
    low = apply_intensity(x, [("low_resolution", 2.0)], 0)
    assert low.shape == x.shape and not torch.equal(low, x)


def test_elastic_deformation_moves_the_label_with_the_image() -> None:
    """With elastic on, image and label are warped by one field: an image that renders the
    label (one channel per label value) must still match its augmented label voxel by voxel.

    Where a channel interpolates to exactly 1, every voxel around the sample point has that
    label, so the nearest-neighbour label must be it; where it is 0, none has it."""
    _, label = volume()
    values = (3, 7)
    image = np.stack([(label == v).astype(np.float32) for v in values])
    config = AugmentConfig(spatial_prob=1.0, rotation_deg=20, elastic=True, elastic_magnitude=(3.0, 3.0),
                           intensity_prob={"default": 0.0})
    moved_by_elastic = 0
    for seed in range(6):
        center = (20.0, 18.0, 15.0)
        img, lab = augment_patch(np.random.default_rng(seed), config, "mr", image, label, center, (24, 24, 24))
        for channel, value in enumerate(values):
            assert torch.all(lab[img[channel] > 1 - 1e-4] == value)
            assert torch.all(lab[img[channel] < 1e-4] != value)
        # The same draw without its elastic field gives another label patch: the field matters.
        spatial = draw_spatial(np.random.default_rng(seed), config)
        _, rigid = extract_patch(image, label, center, (24, 24, 24), SpatialDraw(spatial.matrix))
        moved_by_elastic += int((rigid != lab).sum())
    assert moved_by_elastic > 500
