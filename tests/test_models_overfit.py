"""A tiny Hermes-R must be able to memorise one case with three tasks (a capacity smoke test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hermes.config import ModelConfig
from hermes.models.registry import build_model


def three_structure_case(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright ball, a dark box and a mid-grey ellipsoid on a noisy background."""
    g = torch.Generator().manual_seed(0)
    axis = torch.arange(size, dtype=torch.float32)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    ball = ((x - 9) ** 2 + (y - 10) ** 2 + (z - 11) ** 2) < 6**2
    box = (x >= 18) & (x < 28) & (y >= 4) & (y < 12) & (z >= 16) & (z < 28)
    radius = ((x - 20) / 8) ** 2 + ((y - 22) / 6) ** 2 + ((z - 9) / 5) ** 2
    ellipsoid = radius < 1
    image = 0.3 * torch.randn(size, size, size, generator=g)
    image = image + 2.0 * ball - 1.5 * box + 1.0 * ellipsoid
    target = torch.stack([ball, box, ellipsoid]).float()
    return image[None, None], target[None]


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = logits.sigmoid()
    dims = (2, 3, 4)
    dice = (2 * (probs * target).sum(dims) + 1) / (probs.sum(dims) + target.sum(dims) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


@pytest.mark.slow
def test_tiny_hermes_resunet_overfits_one_case_with_three_tasks() -> None:
    # Budget 300 steps; seeds 0/1 need about 180/40 (one task can sit on a plateau for a while).
    torch.manual_seed(1)
    model = build_model(ModelConfig(preset="tiny"), num_tasks=5, num_modalities=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    image, target = three_structure_case()
    task_ids, modality = torch.tensor([[1, 3, 4]]), torch.tensor([0])
    dice = torch.zeros(3)
    for step in range(300):
        logits = model(image, task_ids, modality).logits
        loss = bce_dice(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pred = (logits.detach() > 0).float()
        dice = 2 * (pred * target).sum((0, 2, 3, 4)) / (pred.sum((0, 2, 3, 4)) + target.sum((0, 2, 3, 4)))
        if step % 10 == 0 and bool((dice > 0.97).all()):
            break
    with torch.no_grad():
        pred = (model(image, task_ids, modality).logits > 0).float()
    dice = 2 * (pred * target).sum((0, 2, 3, 4)) / (pred.sum((0, 2, 3, 4)) + target.sum((0, 2, 3, 4)))
    assert bool((dice > 0.95).all()), f"Dice per task after {step + 1} steps: {dice.tolist()}"
