"""Optimisers (LAMB, AdamW, SGD), global gradient-norm clipping and the per-step LR schedule.

The paper trains with apex ``FusedLAMB`` (CUDA-only) at lr 2e-3, weight decay 1e-5 on every
parameter and a global gradient-norm clip at 1.0. ``timm.optim.Lamb`` is the usual pure-PyTorch
substitute, but timm imports torchvision, which has no build compatible with our pinned CPU
torch, so :class:`Lamb` below re-implements it (You et al. 2019, "Large Batch Optimization for
Deep Learning", NVLAMB variant) with timm's defaults and update rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from hermes.config import OptimConfig


class Lamb(Optimizer):
    """LAMB: Adam moments, then a per-tensor trust ratio ``||w|| / ||update||``.

    Per step t (per parameter tensor w with gradient g)::

        g     <- g / max(1, ||G||_2 / max_grad_norm)      # global norm over all tensors (optional)
        m     <- beta1 m + (1 - beta1) g                  # grad_averaging=True
        v     <- beta2 v + (1 - beta2) g^2
        u     <- (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)   # bias correction
        u     <- u + weight_decay * w                     # decoupled from the moments (AdamW-style,
                                                          # apex adam_w_mode=True), inside the ratio
        r     <- ||w|| / ||u||   (1 when either norm is 0; clamped to <= 1 with trust_clip)
        w     <- w - lr * r * u

    The trust ratio is applied only to tensors with weight decay (or all with ``always_adapt``),
    exactly as timm does. Defaults match ``timm.optim.Lamb``: betas (0.9, 0.999), eps 1e-6,
    weight_decay 0.01, max_grad_norm 1.0. The trainer clips gradients itself (for every
    optimiser, after AMP unscaling) and builds Lamb with ``max_grad_norm=None``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("Lamb: lr, eps and weight_decay must be non-negative")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "grad_averaging": grad_averaging,
            "trust_clip": trust_clip,
            "always_adapt": always_adapt,
            "step": 0,
        }
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    def _global_clip_divisor(self) -> Tensor | None:
        if self.max_grad_norm is None:
            return None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return None
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        return (norm / self.max_grad_norm).clamp(min=1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        divisor = self._global_clip_divisor()
        for group in self.param_groups:
            group["step"] += 1
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            homogeneous = len({(p.device, p.dtype) for p in params}) == 1
            update_fn = _lamb_foreach if homogeneous else _lamb_loop
            update_fn(params, [self.state[p] for p in params], group, divisor)
        return loss


def _coefficients(group: dict) -> tuple[float, float, float, float, float]:
    beta1, beta2 = group["betas"]
    beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
    step = group["step"]
    if group["bias_correction"]:
        return beta1, beta2, beta3, 1.0 - beta1**step, 1.0 - beta2**step
    return beta1, beta2, beta3, 1.0, 1.0


def _trust_ratio(w_norm: Tensor, u_norm: Tensor, clip: bool) -> Tensor:
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    return ratio.clamp(max=1.0) if clip else ratio


def _lamb_loop(params: list[Tensor], states: list[dict], group: dict, divisor: Tensor | None) -> None:
    """One tensor at a time (parameters on several devices or of several dtypes)."""
    beta1, beta2, beta3, bc1, bc2 = _coefficients(group)
    weight_decay = group["weight_decay"]
    for p, state in zip(params, states):
        grad = p.grad if divisor is None else p.grad / divisor.to(p.grad.device)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=beta3)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(group["eps"])
        update = (exp_avg / bc1).div_(denom)
        if weight_decay != 0:
            update.add_(p, alpha=weight_decay)
        if weight_decay != 0 or group["always_adapt"]:
            update.mul_(_trust_ratio(p.norm(2.0), update.norm(2.0), group["trust_clip"]))
        p.add_(update, alpha=-group["lr"])


def _lamb_foreach(params: list[Tensor], states: list[dict], group: dict, divisor: Tensor | None) -> None:
    """The same update with multi-tensor (``torch._foreach_*``) kernels: one call per operation
    for all tensors instead of one per tensor (the per-tensor Python loop costs more than the
    arithmetic for a small model)."""
    beta1, beta2, beta3, bc1, bc2 = _coefficients(group)
    weight_decay = group["weight_decay"]
    grads = [p.grad for p in params]
    if divisor is not None:
        grads = torch._foreach_div(grads, divisor.to(grads[0].device))
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=beta3)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bc2))
    torch._foreach_add_(denom, group["eps"])
    updates = torch._foreach_div(exp_avgs, bc1)
    torch._foreach_div_(updates, denom)
    if weight_decay != 0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    if weight_decay != 0 or group["always_adapt"]:
        w_norms = torch.stack(torch._foreach_norm(params))
        u_norms = torch.stack(torch._foreach_norm(updates))
        ratios = _trust_ratio(w_norms, u_norms, group["trust_clip"])
        torch._foreach_mul_(updates, list(ratios.unbind()))
    torch._foreach_add_(params, updates, alpha=-group["lr"])


def is_decay_exempt(name: str, param: Tensor) -> bool:
    """Biases, normalisation weights, per-task scalars (ndim <= 1) and the prior token pools.

    Under LAMB these matter beyond weight decay: a zero-initialised bias has ``||w|| = 0``, so
    after its first step the trust ratio ``||w|| / ||u||`` is ~lr and it barely moves again
    (measured: <= 0.003 after 200 steps). Token pools are embeddings, which are not decayed.
    """
    return param.ndim <= 1 or name.startswith("priors.") or ".priors." in name


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """``optim.param_groups``: "single" (the paper: decay and trust ratio everywhere) or "split"
    (exempt tensors, :func:`is_decay_exempt`, get weight decay 0 and so, under LAMB, a plain
    Adam step; the trust ratio is only applied to tensors with weight decay)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.param_groups == "single":
        return [{"params": [p for _, p in named]}]
    decay = [p for n, p in named if not is_decay_exempt(n, p)]
    exempt = [p for n, p in named if is_decay_exempt(n, p)]
    groups = [{"params": decay}] if decay else []
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: OptimConfig) -> Optimizer:
    """The configured optimiser over every trainable parameter, in :func:`parameter_groups`."""
    params = parameter_groups(model, config)
    if config.name == "lamb":
        return Lamb(
            params,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            max_grad_norm=None,  # clipped by the trainer (clip_gradients), after AMP unscaling
        )
    if config.name == "adamw":
        return torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
    )


def clip_gradients(parameters: Iterable[Tensor], max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (None: no clipping); return the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    return float(norm)


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base LR at optimiser step ``step`` (0-based) of a ``total_steps`` run.

    Warm-up over ``warmup_steps`` (linear, or the reference's exponential ramp), then poly
    ``(1 - progress)^power``, cosine, or constant decay towards ``min_lr_ratio``. Past
    ``total_steps`` the factor stays at its final value.
    """
    warm = config.warmup_steps
    if step < warm:
        if config.warmup == "exp":
            return math.exp(10.0 * (step / warm - 1.0))
        return (step + 1) / warm
    progress = min(max(step - warm, 0) / max(total_steps - warm, 1), 1.0)
    if config.schedule == "poly":
        decay = (1.0 - progress) ** config.poly_power
    elif config.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def build_scheduler(optimizer: Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """Per-step LambdaLR following :func:`lr_factor`; call ``scheduler.step()`` after every
    optimiser step. ``total_steps`` is the planned run length (``--extend-steps`` re-plans it)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, config, total_steps))


def set_schedule_position(scheduler: LambdaLR, step: int) -> None:
    """Put the scheduler (and the optimiser's LRs) at ``step``: used after resuming, so that a
    re-planned horizon (``--extend-steps``) takes effect from the very next step."""
    scheduler.last_epoch = step
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
