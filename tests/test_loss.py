"""Partial-label loss: hand-computed values, padded slots, empty targets, weights, modality, deep supervision."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from hermes.config import LossConfig
from hermes.training.loss import (
    DICE_SMOOTH,
    HermesLoss,
    PartialLabelLoss,
    deep_supervision_weights,
    downsample_target,
    modality_loss,
    partial_label_terms,
)

LN2 = math.log(2.0)


def _vol(values: list[float]) -> torch.Tensor:
    """A (1, 1, 1, 1, N) volume: one sample, one task, N voxels along z."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, 1, -1)


def test_bce_and_dice_hand_values_and_padded_slot_gets_no_gradient() -> None:
    # task 0: logits 0 -> p = 0.5 on two voxels, target [1, 0]
    # BCE = ln 2 per voxel; Dice = 1 - (2*0.5 + s) / (1 + 1 + s) = 0.5 (up to s)
    # task 1 is a padded slot with extreme logits: must add nothing and get no gradient.
    logits = torch.cat([_vol([0.0, 0.0]), _vol([100.0, -100.0])], dim=1).requires_grad_(True)
    target = torch.cat([_vol([1.0, 0.0]), _vol([0.0, 1.0])], dim=1)
    mask = torch.tensor([[True, False]])
    bce, dice = partial_label_terms(logits, target, mask)
    assert bce.item() == pytest.approx(LN2, abs=1e-6)
    assert dice.item() == pytest.approx(1 - (1 + DICE_SMOOTH) / (2 + DICE_SMOOTH), abs=1e-6)
    (bce + dice).backward()
    assert torch.all(logits.grad[0, 1] == 0)
    # d BCE / d x = (p - g) / n_voxels for the valid channel
    assert logits.grad[0, 0, 0, 0, 0].item() < 0 < logits.grad[0, 0, 0, 0, 1].item()


def test_empty_target_is_excluded_from_dice_but_supervised_by_bce() -> None:
    logits = torch.cat([_vol([0.0, 0.0]), _vol([0.0, 0.0])], dim=1).requires_grad_(True)
    target = torch.cat([_vol([1.0, 0.0]), _vol([0.0, 0.0])], dim=1)  # channel 1 empty in the crop
    bce, dice = partial_label_terms(logits, target, torch.tensor([[True, True]]))
    assert bce.item() == pytest.approx(LN2, abs=1e-6)  # both channels, ln 2 each
    assert dice.item() == pytest.approx(0.5, abs=1e-5)  # channel 0 only (not (0.5 + ~1) / 2)
    bce.backward()
    # BCE pushes the false positives of the empty channel down: d/dx = (0.5 - 0) / (2 voxels * 2 pairs)
    assert torch.allclose(logits.grad[0, 1], torch.full_like(logits.grad[0, 1], 0.125))


def test_all_targets_empty_gives_zero_dice_and_finite_gradients() -> None:
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = torch.zeros_like(logits)
    bce, dice = partial_label_terms(logits, target, torch.ones(2, 3, dtype=torch.bool))
    assert dice.item() == 0.0
    (bce + dice).backward()
    assert torch.isfinite(logits.grad).all()


def test_no_valid_slot_gives_zero_loss_connected_to_the_graph() -> None:
    logits = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    bce, dice = partial_label_terms(logits, torch.ones_like(logits), torch.zeros(1, 2, dtype=torch.bool))
    assert bce.item() == 0.0 and dice.item() == 0.0
    (bce + dice).backward()
    assert torch.all(logits.grad == 0)


def test_voxel_weight_restricts_both_terms() -> None:
    # weight [1, 0]: only voxel 0 (p = 0.5, g = 1) counts.
    # BCE = ln 2; Dice = 1 - (2*0.5 + s) / (0.5 + 1 + s) = 1/3 (up to s)
    logits = _vol([0.0, 0.0]).requires_grad_(True)
    target = _vol([1.0, 0.0])
    weight = _vol([1.0, 0.0])
    bce, dice = partial_label_terms(logits, target, torch.tensor([[True]]), weight)
    assert bce.item() == pytest.approx(LN2, abs=1e-6)
    assert dice.item() == pytest.approx(1 / 3, abs=1e-5)
    (bce + dice).backward()
    assert logits.grad[0, 0, 0, 0, 1].item() == 0.0
    # all-zero weight on a channel: that channel drops out entirely
    bce0, dice0 = partial_label_terms(logits, target, torch.tensor([[True]]), torch.zeros_like(weight))
    assert bce0.item() == 0.0 and dice0.item() == 0.0


def test_perfect_prediction_has_near_zero_loss_and_weights_combine() -> None:
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., 1:3, 1:3, 1:3] = 1
    logits = (target * 2 - 1) * 30
    loss = PartialLabelLoss(bce_weight=2.0, dice_weight=3.0)
    assert loss(logits, target, torch.tensor([[True]])).item() < 1e-6
    random_logits = torch.zeros_like(target)
    terms = loss.terms(random_logits, target, torch.tensor([[True]]))
    assert terms["seg"].item() == pytest.approx(2 * terms["bce"].item() + 3 * terms["dice"].item())


def test_modality_loss_ignores_unknown_modality() -> None:
    logits = torch.zeros(2, 3, requires_grad=True)  # M = 3 known modalities
    ids = torch.tensor([1, 3])  # sample 1 is "unknown" (id M)
    loss = modality_loss(logits, ids)
    assert loss.item() == pytest.approx(math.log(3.0), abs=1e-6)  # sample 0 only
    loss.backward()
    assert torch.all(logits.grad[1] == 0)
    all_unknown = modality_loss(torch.zeros(2, 3, requires_grad=True), torch.tensor([3, 3]))
    assert all_unknown.item() == 0.0


def test_downsample_target_keeps_thin_structures() -> None:
    target = torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, 1, 2, 3] = 1  # one voxel: nearest-neighbour subsampling at stride 2 would drop it
    low = downsample_target(target, (2, 2, 2))
    assert low.shape == (1, 1, 2, 2, 2)
    assert low.sum().item() == 1 and low[0, 0, 0, 1, 1].item() == 1


def test_deep_supervision_weights() -> None:
    assert deep_supervision_weights(3, None) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(2, [0.5, 0.5]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="deep_supervision_weights"):
        deep_supervision_weights(3, [1.0])


@dataclass
class _Out:
    logits: torch.Tensor
    modality_logits: torch.Tensor | None = None
    deep_supervision: list[torch.Tensor] = field(default_factory=list)


def test_hermes_loss_combines_terms() -> None:
    torch.manual_seed(0)
    target = (torch.rand(2, 2, 8, 8, 8) > 0.7).float()
    mask = torch.tensor([[True, True], [True, False]])
    batch = {"target": target, "task_mask": mask, "modality_id": torch.tensor([0, 2])}
    out = _Out(torch.randn(2, 2, 8, 8, 8), torch.randn(2, 2), [torch.randn(2, 2, 4, 4, 4)])
    terms = HermesLoss(LossConfig(modality_weight=0.01))(out, batch)
    main = PartialLabelLoss()(out.logits, target, mask)
    aux = PartialLabelLoss()(out.deep_supervision[0], downsample_target(target, (4, 4, 4)), mask)
    assert terms["seg"].item() == pytest.approx((2 * main.item() + aux.item()) / 3, rel=1e-5)
    mod = modality_loss(out.modality_logits, batch["modality_id"])  # sample 1 is unknown (M = 2)
    assert terms["total"].item() == pytest.approx(terms["seg"].item() + 0.01 * mod.item(), rel=1e-5)
