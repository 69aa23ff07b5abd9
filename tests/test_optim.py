"""LAMB against hand-computed steps, LR schedules, gradient clipping, EMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hermes.config import OptimConfig
from hermes.training.ema import ModelEMA
from hermes.training.optim import (
    Lamb,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    lr_factor,
    set_schedule_position,
)


def _lamb_step_by_hand(w, g, m, v, t, lr, wd, b1=0.9, b2=0.999, eps=1e-6):
    """One LAMB step written out element by element (plain Python floats)."""
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    u = [(mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) + wd * wi for mi, vi, wi in zip(m, v, w)]
    ratio = math.sqrt(sum(x * x for x in w)) / math.sqrt(sum(x * x for x in u))
    w = [wi - lr * ratio * ui for wi, ui in zip(w, u)]
    return w, m, v


def test_lamb_matches_hand_computed_steps() -> None:
    w0 = [3.0, 4.0]
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = Lamb([p], lr=0.1, weight_decay=0.1, max_grad_norm=None)
    w, m, v = w0, [0.0, 0.0], [0.0, 0.0]
    for t, g in enumerate([[0.6, -0.8], [0.3, 0.1]], start=1):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        w, m, v = _lamb_step_by_hand(w, g, m, v, t, lr=0.1, wd=0.1)
        assert p.detach().tolist() == pytest.approx(w, abs=1e-12)
    # first step by hand: u = sign(g) + wd*w = [1.3, -0.6], ratio = 5/|u| -> w = w0 - 0.1*ratio*u
    ratio = 5.0 / math.hypot(1.3, -0.6)
    first = [3.0 - 0.1 * ratio * 1.3, 4.0 + 0.1 * ratio * 0.6]
    p2 = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt2 = Lamb([p2], lr=0.1, weight_decay=0.1, max_grad_norm=None, eps=0.0)
    p2.grad = torch.tensor([0.6, -0.8], dtype=torch.float64)
    opt2.step()
    assert p2.detach().tolist() == pytest.approx(first, abs=1e-12)


def test_lamb_global_clip_divides_all_gradients_by_the_global_norm() -> None:
    a = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = Lamb([a, b], lr=0.01, weight_decay=0.01, max_grad_norm=1.0)
    ga, gb = [3.0, 0.0], [4.0]  # global norm 5 -> divided by 5
    a.grad, b.grad = torch.tensor(ga, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64)
    opt.step()
    # the moments hold the clipped gradient g/5: m1 = 0.1 * g/5, v1 = 0.001 * (g/5)^2
    state = opt.state[a]
    assert state["exp_avg"].tolist() == pytest.approx([0.1 * 3 / 5, 0.0])
    assert opt.state[b]["exp_avg_sq"].tolist() == pytest.approx([0.001 * (4 / 5) ** 2])


def test_lamb_without_weight_decay_is_adam_and_zero_weights_keep_ratio_one() -> None:
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = Lamb([p], lr=0.5, weight_decay=0.0, max_grad_norm=None, eps=0.0)
    p.grad = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    opt.step()
    assert p.detach().tolist() == pytest.approx([-0.5, 0.5, -0.5])  # lr * sign(g) at step 1
    q = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt_q = Lamb([q], lr=0.5, weight_decay=0.1, max_grad_norm=None, eps=0.0)
    q.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt_q.step()  # ||w|| = 0 -> ratio 1
    assert q.detach().tolist() == pytest.approx([-0.5, 0.5])


def test_lamb_state_dict_round_trip_is_weights_only(tmp_path) -> None:
    model = nn.Linear(3, 2)
    opt = Lamb(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    opt2 = Lamb(model.parameters(), lr=0.01)
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert opt2.param_groups[0]["step"] == 1
    assert torch.equal(opt2.state[model.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


@pytest.mark.parametrize("name,cls", [("lamb", Lamb), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_build_optimizer(name: str, cls: type) -> None:
    opt = build_optimizer(nn.Linear(2, 2), OptimConfig(name=name, lr=0.1))
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.1


def test_clip_gradients_returns_norm_before_clipping() -> None:
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([p], 1.0) == pytest.approx(5.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([p], None) == pytest.approx(5.0) and p.grad.norm().item() == pytest.approx(5.0)


def test_lr_factor_warmup_poly_cosine() -> None:
    cfg = OptimConfig(warmup_steps=10, schedule="poly", poly_power=0.9)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.5**0.9)
    assert lr_factor(110, cfg, 110) == 0.0 and lr_factor(500, cfg, 110) == 0.0
    cos = OptimConfig(warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(50, cos, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    exp = OptimConfig(warmup_steps=5, warmup="exp")
    assert lr_factor(0, exp, 100) == pytest.approx(math.exp(-10))
    assert lr_factor(5, OptimConfig(warmup_steps=5, schedule="constant"), 100) == 1.0


def test_scheduler_steps_follow_lr_factor_and_can_be_repositioned() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=2)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=10)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_factor(s, cfg, 10) for s in range(5)])
    longer = build_scheduler(opt, cfg, total_steps=20)
    set_schedule_position(longer, 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor(5, cfg, 20))


def test_ema_warmup_params_and_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.5)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model, step=0)  # decay min(1 - 1/1, 0.5) = 0: a copy
    assert torch.equal(ema.module[0].weight, model[0].weight)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(4.0)
    ema.update(model, step=5)  # decay min(1 - 1/6, 0.5) = 0.5
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 2.0))
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 3.0))
    assert ema.module[1].num_batches_tracked.item() == 7
    assert ema.decay_at(1) == 0.5 and ema.decay_at(1000) == 0.5


def test_lamb_multi_tensor_path_equals_per_tensor_path(monkeypatch) -> None:
    import hermes.training.optim as optim_module

    torch.manual_seed(0)
    shapes = [(4, 3), (7,), (2, 2, 3), (1,)]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    start[3].zero_()  # a zero tensor: trust ratio 1
    results = []
    for use_loop in (False, True):
        if use_loop:
            monkeypatch.setattr(optim_module, "_lamb_foreach", optim_module._lamb_loop)
        params = [nn.Parameter(t.clone()) for t in start]
        opt = Lamb(params, lr=0.05, weight_decay=0.1, max_grad_norm=1.0, trust_clip=True)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float64) + step + i).view_as(p) * 3
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
