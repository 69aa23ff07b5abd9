"""MedContext: masking layout, teacher EMA, partial-label consistency, lesion exclusion, resume."""

from __future__ import annotations

import copy
import io
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hermes.config import MedContextConfig, validate
from hermes.errors import ConfigError, ModelError
from hermes.training.ema import ModelEMA
from hermes.training.loss import PartialLabelLoss
from hermes.training.medcontext import MedContext, resolve_task_names, teacher_momentum_at, unwrap_model

TASKS = ["D1/liver", "D1/tumor", "D2/liver", "D2/spleen"]
NULL = len(TASKS)


class TinyNet(nn.Module):
    """The smallest network with the Hermes model call: one channel per requested task."""

    def __init__(self, num_tasks: int = len(TASKS), in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, 4, 3, padding=1)
        self.norm = nn.BatchNorm3d(4)  # has running-stat buffers: the EMA must average them
        self.head = nn.Conv3d(4, num_tasks, 1)

    def forward(self, image: Tensor, task_ids: Tensor, modality_id: Tensor, task_mask: Tensor | None = None):
        all_tasks = self.head(F.relu(self.norm(self.conv(image))))
        padded = torch.cat([all_tasks, torch.zeros_like(all_tasks[:, :1])], dim=1)  # null task
        index = task_ids.view(*task_ids.shape, *([1] * (image.ndim - 2))).expand(-1, -1, *image.shape[2:])
        return SimpleNamespace(logits=padded.gather(1, index), modality_logits=None)


def bce_loss(logits: Tensor, target: Tensor, task_mask: Tensor, voxel_weight: Tensor | None = None) -> Tensor:
    """Partial-label BCE with the trainer's loss signature (used until the real one is wired in)."""
    per_voxel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    weight = task_mask.float().view(*task_mask.shape, *([1] * (logits.ndim - 2))).expand_as(per_voxel)
    if voxel_weight is not None:
        weight = weight * voxel_weight
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0)


def make(model: nn.Module | None = None, **overrides) -> MedContext:
    config = MedContextConfig(enabled=True, **overrides)
    return MedContext(config, model if model is not None else TinyNet(), TASKS)


def assert_close(actual: Tensor, expected: Tensor) -> None:
    # Not torch.testing.assert_close: its first call imports torch.distributed.tensor (seconds).
    assert torch.allclose(actual, expected, rtol=1.3e-6, atol=1e-5), (actual, expected)


def half_up(x: float) -> int:
    return math.floor(x + 0.5)


# ---------------------------------------------------------------------------------- masking
def _consistent_offsets(mask: Tensor, axis: int, patch: int) -> list[int]:
    """Offsets o for which `mask` is constant inside every cell along `axis`."""
    changes = mask.narrow(axis, 1, mask.shape[axis] - 1) != mask.narrow(axis, 0, mask.shape[axis] - 1)
    changed_at = changes.any(dim=tuple(d for d in range(mask.ndim) if d != axis))
    positions = torch.nonzero(changed_at).flatten().tolist()  # change between i and i+1
    return [o for o in range(patch) if all((i + 1 + o) % patch == 0 for i in positions)]


def test_mask_ratio_and_patch_layout() -> None:
    patch, ratio, shape = (4, 6, 8), 0.4, (20, 24, 12)
    mc = make(mask_patch=list(patch), mask_ratio=ratio)
    image = torch.randn(6, 2, *shape)
    _, hidden = mc.mask(image, torch.Generator().manual_seed(0))
    assert hidden.shape == (6, 1, *shape) and hidden.dtype == torch.bool
    seen_offsets: set[int] = set()
    for b in range(6):
        m = hidden[b, 0]
        per_axis = [_consistent_offsets(m, a, p) for a, p in enumerate(patch)]
        matches = []
        for offsets in itertools.product(*per_axis):
            # First voxel of each cell decides the cell (the mask is constant inside cells).
            starts = [sorted({0, *range((p - o) % p or p, s, p)}) for s, o, p in zip(shape, offsets, patch)]
            n_cells = math.prod(len(st) for st in starts)
            hidden_cells = int(
                m[torch.tensor(starts[0])][:, torch.tensor(starts[1])][:, :, torch.tensor(starts[2])].sum()
            )
            if hidden_cells == half_up(ratio * n_cells):
                matches.append(offsets)
        assert matches, f"sample {b}: hidden voxels are not round(ratio * cells) grid cells"
        seen_offsets.update(o[0] for o in matches)
    # One mask per sample, not one per batch; the grid offset varies between samples.
    assert len({tuple(hidden[b].flatten().tolist()) for b in range(6)}) == 6
    assert len(seen_offsets) > 1


def test_mask_fraction_matches_ratio_and_is_reproducible() -> None:
    mc = make(mask_patch=[4, 4, 4], mask_ratio=0.6)
    image = torch.randn(64, 1, 16, 16, 16)
    _, hidden = mc.mask(image, torch.Generator().manual_seed(1))
    assert abs(hidden.float().mean().item() - 0.6) < 0.03
    _, again = mc.mask(image, torch.Generator().manual_seed(1))
    assert torch.equal(hidden, again)
    _, other = mc.mask(image, torch.Generator().manual_seed(2))
    assert not torch.equal(hidden, other)
    # Ratio extremes: nothing and everything hidden.
    assert not make(mask_ratio=0.0).mask(image[:2])[1].any()
    assert make(mask_ratio=1.0).mask(image[:2])[1].all()


def test_masked_image_is_fill_on_hidden_voxels_and_input_elsewhere() -> None:
    mc = make(mask_patch=[4, 4, 4], mask_ratio=0.5, mask_value=-1.25)
    image = torch.randn(3, 2, 12, 16, 8)
    masked, hidden = mc.mask(image, torch.Generator().manual_seed(3))
    full = hidden.expand_as(image)
    assert hidden.any() and (~hidden).any()
    assert torch.all(masked[full] == -1.25)
    assert torch.equal(masked[~full], image[~full])
    assert masked.dtype == image.dtype and masked.shape == image.shape


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="mask_ratio"):
        validate(MedContextConfig, {"mask_ratio": 1.5})
    with pytest.raises(ConfigError, match="mask_patch"):
        validate(MedContextConfig, {"mask_patch": [16, 16]})


# ---------------------------------------------------------------------------------- teacher
def _batch(b: int = 2, shape: tuple[int, ...] = (8, 8, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 1, *shape, generator=g)
    task_ids = torch.tensor([[0, 1, NULL], [2, 3, NULL]])[:b]
    task_mask = task_ids != NULL
    target = (torch.rand(b, 3, *shape, generator=g) > 0.7).float() * task_mask[..., None, None, None]
    return image, target, task_ids, task_mask, torch.zeros(b, dtype=torch.long)


def test_momentum_schedule() -> None:
    assert teacher_momentum_at(0, 0.996) == 0.0
    assert teacher_momentum_at(1, 0.996) == 0.5
    assert teacher_momentum_at(10_000, 0.996) == 0.996


def test_teacher_gets_no_gradients_and_follows_the_ema_formula() -> None:
    torch.manual_seed(0)
    student = TinyNet()
    momentum = 0.8
    mc = MedContext(
        MedContextConfig(enabled=True, teacher_momentum=momentum, mask_patch=[4, 4, 4]),
        nn.DataParallel(student),
        TASKS,
    )  # a wrapped model is unwrapped
    assert unwrap_model(nn.DataParallel(student)) is student
    assert not mc.teacher.training
    assert all(not p.requires_grad for p in mc.teacher.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(mc.teacher.parameters(), student.parameters()))

    reference = {k: v.clone() for k, v in mc.teacher.state_dict().items()}
    image, target, task_ids, task_mask, modality = _batch()
    generator = torch.Generator().manual_seed(0)
    first_step = 3  # a resumed run: the schedule follows the global step, not a local counter
    for step in range(first_step, first_step + 4):
        student.train()
        out = student(image, task_ids, modality, task_mask)
        masked, hidden = mc.mask(image, generator)
        out_m = student(masked, task_ids, modality, task_mask)
        teacher = mc.teacher_probabilities(image, task_ids, modality, task_mask)
        assert teacher.dtype == torch.float32 and not teacher.requires_grad
        losses = mc.loss(out_m.logits, teacher, target, task_ids, task_mask, hidden, step, bce_loss)
        student.zero_grad(set_to_none=True)
        (bce_loss(out.logits, target, task_mask) + losses["total"]).backward()
        with torch.no_grad():  # plain SGD by hand: torch.optim's first use imports dynamo (seconds)
            for p in student.parameters():
                p -= 0.1 * p.grad
        mc.update_teacher(student, step)

        m = teacher_momentum_at(step, momentum)
        for name, value in student.state_dict().items():
            if value.is_floating_point():
                reference[name] = m * reference[name] + (1 - m) * value
            else:
                reference[name] = value.clone()
    assert all(p.grad is None for p in mc.teacher.parameters())
    assert not mc.teacher.training
    for name, value in mc.teacher.state_dict().items():
        assert torch.allclose(value.double(), reference[name].double(), rtol=1e-6, atol=1e-7), name
    # Buffers were averaged too (BatchNorm running stats moved away from their init).
    assert not torch.equal(mc.teacher.norm.running_mean, torch.zeros(4))
    assert mc.teacher.norm.num_batches_tracked == student.norm.num_batches_tracked


def test_reused_validation_ema_is_the_teacher_and_not_updated_twice() -> None:
    student = TinyNet()
    ema = ModelEMA(student, decay=0.9)
    ema_module = ema.module
    mc = MedContext(MedContextConfig(enabled=True, reuse_validation_ema=True), student, TASKS, ema=ema)
    assert mc.teacher is ema_module and not ema_module.training
    before = {k: v.clone() for k, v in ema_module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    mc.update_teacher(student, 5)
    assert all(torch.equal(before[k], v) for k, v in ema_module.state_dict().items())
    with pytest.raises(ConfigError, match="reuse_validation_ema"):
        MedContext(MedContextConfig(enabled=True, reuse_validation_ema=True), student, TASKS)


# ---------------------------------------------------------------------------------- losses
def test_consistency_uses_only_the_samples_own_tasks() -> None:
    torch.manual_seed(0)
    mc = make()
    shape = (4, 4, 4)
    task_ids = torch.tensor([[0, 1, NULL], [3, NULL, NULL]])
    task_mask = task_ids != NULL
    logits = torch.randn(2, 3, *shape, requires_grad=True)
    teacher = torch.rand(2, 3, *shape)
    target = torch.zeros(2, 3, *shape)
    hidden = torch.zeros(2, 1, *shape, dtype=torch.bool)
    losses = mc.loss(logits, teacher, target, task_ids, task_mask, hidden, 0, bce_loss)

    sq = (torch.sigmoid(logits) - teacher).square().mean(dim=(2, 3, 4))
    expected = (sq[0, 0] + sq[0, 1] + sq[1, 0]) / 3
    assert_close(losses["consistency"], expected)
    losses["consistency"].backward()
    assert torch.all(logits.grad[~task_mask] == 0) and torch.all(logits.grad[task_mask].abs().sum() > 0)

    # Padded slots can hold anything: the losses do not change.
    other_logits, other_teacher = logits.detach().clone(), teacher.clone()
    other_logits[~task_mask] = 50.0
    other_teacher[~task_mask] = 0.0
    again = mc.loss(other_logits, other_teacher, target, task_ids, task_mask, hidden, 0, bce_loss)
    assert_close(again["consistency"], losses["consistency"])
    assert_close(again["masked_supervised"], losses["masked_supervised"])


def test_weights_and_rampup() -> None:
    mc = make(consistency_weight=0.5, masked_supervision_weight=2.0, consistency_rampup_steps=10)
    image, target, task_ids, task_mask, _ = _batch()
    logits = torch.randn_like(target)
    teacher = torch.rand_like(target)
    hidden = torch.zeros_like(image, dtype=torch.bool)
    for step, ramp in [(0, 0.0), (5, 0.5), (10, 1.0), (50, 1.0)]:
        out = mc.loss(logits, teacher, target, task_ids, task_mask, hidden, step, bce_loss)
        assert_close(out["total"], 2.0 * out["masked_supervised"] + 0.5 * ramp * out["consistency"])
    # Unlike the reference's norm-scaled MSE (~1e-5), the term is on the scale of the BCE.
    assert out["consistency"] > 0.01 * out["masked_supervised"]


def test_excluded_tasks_get_no_gradient_from_hidden_voxels() -> None:
    torch.manual_seed(0)
    mc = make(exclude_tasks=["tumor"], mask_patch=[2, 2, 2], mask_ratio=0.5)
    assert mc.excluded_task_ids == [1]
    image, target, task_ids, task_mask, _ = _batch(shape=(8, 8, 8))
    _, hidden = mc.mask(image, torch.Generator().manual_seed(0))
    logits = torch.randn_like(target, requires_grad=True)
    teacher = torch.rand_like(target)
    mc.loss(logits, teacher, target, task_ids, task_mask, hidden, 0, bce_loss)["total"].backward()
    grad = logits.grad
    tumour, liver = grad[0, 1], grad[0, 0]  # sample 0 queries D1/liver (0) and D1/tumor (1)
    h = hidden[0, 0]
    assert torch.all(tumour[h] == 0)
    assert torch.all(tumour[~h] != 0)
    assert torch.all(liver[h] != 0)  # anatomy is still supervised where it is hidden

    # Same with the trainer's real partial-label BCE + Dice.
    logits.grad = None
    losses = mc.loss(logits, teacher, target, task_ids, task_mask, hidden, 0, PartialLabelLoss())
    losses["total"].backward()
    assert torch.all(logits.grad[0, 1][h] == 0) and torch.any(logits.grad[0, 1][~h] != 0)
    assert torch.any(logits.grad[0, 0][h] != 0)


def test_task_name_resolution() -> None:
    assert resolve_task_names(["D2/liver", "spleen"], TASKS) == [2, 3]
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_task_names(["liver"], TASKS)
    with pytest.raises(ConfigError, match="unknown task 'kidney'"):
        resolve_task_names(["kidney"], TASKS)


# ---------------------------------------------------------------------------------- resume
def test_state_round_trip() -> None:
    torch.manual_seed(0)
    student = TinyNet()
    mc = make(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3)
    mc.update_teacher(student, 7)
    buffer = io.BytesIO()
    torch.save(mc.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = make(TinyNet())  # differently initialised
    restored.load_state_dict(state)
    assert restored.last_update_step == 7
    for (name, a), (_, b) in zip(mc.teacher.state_dict().items(), restored.teacher.state_dict().items()):
        assert torch.equal(a, b), name
    # Saving must not alias live weights.
    mc.update_teacher(student, 8)
    assert restored.last_update_step == 7

    reuse = MedContext(
        MedContextConfig(enabled=True, reuse_validation_ema=True),
        student,
        TASKS,
        ema=SimpleNamespace(module=copy.deepcopy(student)),
    )
    assert "teacher" not in reuse.state_dict()
    with pytest.raises(ModelError, match="reuse_validation_ema"):
        reuse.load_state_dict(state)


def test_term_gradients_are_finite_and_the_context_term_reaches_the_student_only() -> None:
    """With term_gradients the step reports each term's size, gradient norm and share; the
    consistency term has a gradient on the student, and the teacher gets none."""
    from hermes.config import LossConfig
    from hermes.runtime import AmpSettings
    from hermes.training.loss import HermesLoss
    from hermes.training.step import train_step

    class Net(TinyNet):
        def forward(self, image, task_ids, modality_id, task_mask=None):  # type: ignore[override]
            out = super().forward(image, task_ids, modality_id, task_mask)
            return SimpleNamespace(logits=out.logits, modality_logits=None, deep_supervision=[])

    torch.manual_seed(0)
    student = Net()
    mc = make(student, mask_patch=[4, 4, 4], consistency_weight=10.0)
    with torch.no_grad():  # a teacher that disagrees, so consistency has a gradient
        for p in mc.teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))
    image, target, task_ids, task_mask, modality = _batch()
    batch = {"image": image, "target": target, "task_ids": task_ids, "task_mask": task_mask, "modality_id": modality}
    amp = AmpSettings(dtype=None, use_scaler=False, channels_last=False, device_type="cpu")
    loss_fn = HermesLoss(LossConfig(modality_weight=0.0))

    def step(measure: bool) -> dict[str, float]:
        optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
        return train_step(student, batch, loss_fn, optimizer, amp, None, None, medcontext=mc,
                          generator=torch.Generator().manual_seed(0), step=5, term_gradients=measure)

    plain = step(False)
    assert not any(k.startswith("grad_share_") for k in plain)
    terms = step(True)
    names = ("supervised", "masked_supervised", "consistency")
    for key in ("loss", "consistency", "masked_supervised", *(f"grad_norm_{n}" for n in names)):
        assert math.isfinite(terms[key]), key
    assert terms["grad_norm_consistency"] > 0 and terms["consistency"] > 0
    assert math.isclose(sum(terms[f"grad_share_{n}"] for n in names), 1.0, rel_tol=1e-6)
    assert math.isclose(terms["loss"], plain["loss"], rel_tol=1e-6)  # measuring does not change the step
    assert all(p.grad is None and not p.requires_grad for p in mc.teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


# ---------------------------------------------------------------------------------- ablation options
def test_tube_masks_are_constant_along_z_with_the_exact_xy_cell_count() -> None:
    shape, ratio = (16, 12, 10), 0.4
    image = torch.randn(5, 1, *shape)
    # Cells of one voxel in x-y: the hidden x-y fraction is exactly round(ratio * cells) / cells.
    _, hidden = make(mask_shape="tubes", mask_patch=[1, 1, 4], mask_ratio=ratio).mask(
        image, torch.Generator().manual_seed(0)
    )
    cells = shape[0] * shape[1]
    for b in range(5):
        m = hidden[b, 0]
        assert torch.equal(m, m[..., :1].expand_as(m)), "a tube mask must be constant along z"
        assert int(m[..., 0].sum()) == half_up(ratio * cells)
    # Larger x-y cells with a random grid offset: round(ratio * x-y cells) cells are hidden.
    patch = (4, 6)
    _, hidden = make(mask_shape="tubes", mask_patch=[*patch, 4], mask_ratio=ratio).mask(
        image, torch.Generator().manual_seed(1)
    )
    for b in range(5):
        m = hidden[b, 0]
        assert torch.equal(m, m[..., :1].expand_as(m))
        plane = m[..., 0]
        offsets = [_consistent_offsets(plane, a, p)[0] for a, p in enumerate(patch)]
        starts = [sorted({0, *range((p - o) % p or p, s, p)}) for s, o, p in zip(shape, offsets, patch)]
        n_cells = len(starts[0]) * len(starts[1])
        assert int(plane[torch.tensor(starts[0])][:, torch.tensor(starts[1])].sum()) == half_up(ratio * n_cells)
    # The default blocks vary along z (so the test above would catch tubes being ignored).
    _, blocks = make(mask_patch=[4, 6, 4], mask_ratio=ratio).mask(image, torch.Generator().manual_seed(1))
    assert any(not torch.equal(blocks[b, 0], blocks[b, 0, ..., :1].expand_as(blocks[b, 0])) for b in range(5))


def test_consistency_target_fraction_sets_the_weight_from_the_supervised_loss() -> None:
    torch.manual_seed(0)
    fraction = 0.3
    mc = make(consistency_target_fraction=fraction, consistency_weight=7.0)  # the fraction overrides it
    image, target, task_ids, task_mask, _ = _batch()
    hidden = torch.zeros_like(image, dtype=torch.bool)
    logits = torch.randn_like(target, requires_grad=True)
    teacher = torch.rand_like(target, requires_grad=True)  # must get no gradient (it is detached)
    clean = torch.randn_like(target, requires_grad=True)
    supervised = bce_loss(clean, target, task_mask)
    out = mc.loss(logits, teacher, target, task_ids, task_mask, hidden, 0, bce_loss, supervised=supervised)
    assert math.isclose(float(out["weighted_consistency"].detach() / supervised.detach()), fraction, rel_tol=1e-5)
    w = float(out["weight_consistency"])
    assert math.isclose(w, fraction * supervised.item() / out["consistency"].item(), rel_tol=1e-5)
    assert not math.isclose(w, 7.0, rel_tol=0.1)  # not the fixed consistency_weight
    out["weighted_consistency"].backward()
    assert clean.grad is None and teacher.grad is None  # the weight is detached: student logits only
    expected = torch.autograd.grad(
        make().loss(logits, teacher, target, task_ids, task_mask, hidden, 0, bce_loss)["consistency"], logits
    )[0]
    assert_close(logits.grad, w * expected)
    # The ramps still multiply the weight.
    ramped = make(consistency_target_fraction=fraction, consistency_rampup_steps=10, masked_rampup_steps=4)
    half = ramped.loss(logits, teacher, target, task_ids, task_mask, hidden, 2, bce_loss, supervised=supervised)
    ratio = half["weighted_consistency"].detach() / supervised.detach()
    assert math.isclose(float(ratio), fraction * 0.2 * 0.5, rel_tol=1e-5)
    with pytest.raises(ValueError, match="supervised"):
        mc.loss(logits, teacher, target, task_ids, task_mask, hidden, 0, bce_loss)
    # Off (the default): the fixed weight, whatever the supervised loss.
    fixed = make(consistency_weight=2.0).loss(logits, teacher, target, task_ids, task_mask, hidden, 0, bce_loss,
                                              supervised=supervised)
    assert_close(fixed["weighted_consistency"], 2.0 * fixed["consistency"])
    with pytest.raises(ConfigError, match="consistency_target_fraction"):
        validate(MedContextConfig, {"consistency_target_fraction": 0.0})


def test_cosine_teacher_momentum_spans_the_planned_run() -> None:
    student = TinyNet()
    mc = make(student, teacher_momentum_schedule="cosine", teacher_momentum_start=0.9, teacher_momentum=0.999)
    with pytest.raises(ValueError, match="set_total_steps"):
        mc.momentum_at(0)
    total = 50
    mc.set_total_steps(total)
    momenta = [mc.momentum_at(step) for step in range(total)]
    assert momenta[0] == pytest.approx(0.9) and momenta[-1] == pytest.approx(0.999)
    assert all(b > a for a, b in itertools.pairwise(momenta))
    assert momenta[total // 2] == pytest.approx((0.9 + 0.999) / 2, abs=2e-3)  # a cosine, symmetric
    assert mc.momentum_at(total + 10) == pytest.approx(0.999)
    # update_teacher applies it: at step 0 the teacher keeps 0.9 of itself (no 1 - 1/(t+1) warm-up).
    before = {k: v.clone() for k, v in mc.teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    mc.update_teacher(student, 0)
    assert_close(mc.teacher.conv.weight, 0.9 * before["conv.weight"] + 0.1 * student.conv.weight)
    # The constant default keeps the Hermes warm-up (step 0 copies the student).
    assert make(teacher_momentum=0.99).momentum_at(0) == 0.0
    with pytest.raises(ConfigError, match="cosine"):
        validate(MedContextConfig, {"teacher_momentum_schedule": "cosine", "reuse_validation_ema": True})


def test_masked_rampup_ramps_both_terms() -> None:
    mc = make(masked_rampup_steps=10, consistency_rampup_steps=20, masked_supervision_weight=2.0,
              consistency_weight=0.5)
    image, target, task_ids, task_mask, _ = _batch()
    logits, teacher = torch.randn_like(target), torch.rand_like(target)
    hidden = torch.zeros_like(image, dtype=torch.bool)
    for step, masked_ramp, cons_ramp in [(0, 0.0, 0.0), (5, 0.5, 0.25), (10, 1.0, 0.5), (40, 1.0, 1.0)]:
        out = mc.loss(logits, teacher, target, task_ids, task_mask, hidden, step, bce_loss)
        assert_close(out["weighted_masked_supervised"], 2.0 * masked_ramp * out["masked_supervised"])
        assert_close(out["weighted_consistency"], 0.5 * masked_ramp * cons_ramp * out["consistency"])
        assert_close(out["total"], out["weighted_masked_supervised"] + out["weighted_consistency"])
        assert float(out["weight_masked_supervised"]) == pytest.approx(2.0 * masked_ramp)
    assert float(make().loss(logits, teacher, target, task_ids, task_mask, hidden, 0, bce_loss)
                 ["weight_masked_supervised"]) == 1.0  # off: full weight from step 0
