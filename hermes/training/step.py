"""One optimisation step, shared by ``hermes train`` and the adaptation commands (finetune,
extend): forward, loss, backward, clip, optimiser step. What differs between them (frozen
parameters, rehearsal batches, distillation, the gate) stays in hermes/adaptation/.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hermes.models.channel_stem import channel_inputs
from hermes.runtime import AmpSettings
from hermes.training.loss import HermesLoss
from hermes.training.optim import clip_gradients

log = logging.getLogger("hermes.training")

# (model, batch, step) -> extra named loss terms, added to the total
ExtraLoss = Callable[[nn.Module, dict[str, Any], int], dict[str, torch.Tensor]]


@dataclass
class _View:
    """A slice of a model output (the clean or the masked half of a MedContext batch)."""

    logits: torch.Tensor
    modality_logits: torch.Tensor | None
    deep_supervision: list[torch.Tensor]


def _half(out: Any, part: slice) -> _View:
    mod = out.modality_logits[part] if out.modality_logits is not None else None
    return _View(out.logits[part], mod, [d[part] for d in out.deep_supervision])


def medcontext_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Masks are a pure function of (seed, rank, step): nothing to checkpoint for them."""
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, rank, step, 0x4D43]).generate_state(1)[0]))
    return generator


def train_step(
    model: nn.Module,
    batch: dict[str, Any],
    loss_fn: HermesLoss,
    optimizer: torch.optim.Optimizer,
    amp: AmpSettings,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
    medcontext: Any | None = None,
    generator: torch.Generator | None = None,
    step: int = 0,
    extra_loss: ExtraLoss | None = None,
    term_gradients: bool = False,
) -> dict[str, float]:
    """Forward, loss, backward, clip, optimiser step. Returns the loss terms and the gradient norm.

    With MedContext the clean and the masked images go through the network as one batch of
    2B (identical prompts): one forward and one backward per step, which DDP requires, and
    equivalent to two passes for per-sample normalisation (instance/group norm).
    ``extra_loss(model, batch, step)`` adds named terms computed after the forward (the
    adaptation commands' distillation). A non-finite gradient norm skips the optimiser step
    (logged); the caller decides whether a non-finite loss ends the run. ``term_gradients``
    (MedContext only): also return each term's gradient norm (``grad_norm_<term>``) and its
    share of their sum (``grad_share_<term>``), at the cost of one extra backward per term.
    """
    contributions: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    image, task_ids, task_mask = batch["image"], batch["task_ids"], batch["task_mask"]
    # the prompt's modality (modality-prompt dropout, hermes/data/sampling.py); the loss reads
    # the true batch["modality_id"]
    modality_id = batch.get("modality_prompt_id", batch["modality_id"])
    optimizer.zero_grad(set_to_none=True)
    with amp.autocast():
        if medcontext is None:
            terms = loss_fn(model(image, task_ids, modality_id, task_mask, **channel_inputs(model, batch)), batch)
        else:
            n = image.shape[0]
            masked, hidden = medcontext.mask(image, generator)
            teacher = medcontext.teacher_probabilities(
                image, task_ids, modality_id, task_mask, **channel_inputs(medcontext.teacher, batch)
            )
            out = model(
                torch.cat([image, masked]), task_ids.repeat(2, 1), modality_id.repeat(2), task_mask.repeat(2, 1),
                **channel_inputs(model, batch, repeat=2),
            )
            terms = loss_fn(_half(out, slice(0, n)), batch)  # the masked half stays out of the modality loss
            extra = medcontext.loss(
                out.logits[n:], teacher, batch["target"], task_ids, batch.get("loss_mask", task_mask), hidden, step,
                loss_fn.segmentation, supervised=terms["seg"],
            )
            contributions = {"supervised": terms["total"], "masked_supervised": extra["weighted_masked_supervised"],
                             "consistency": extra["weighted_consistency"]}
            terms["masked_supervised"] = extra["masked_supervised"]
            terms["consistency"] = extra["consistency"]
            # effective multipliers (ramps, consistency_target_fraction): logged, not part of the loss
            weights = {k: extra[k] for k in ("weight_masked_supervised", "weight_consistency")}
            terms["total"] = terms["total"] + extra["total"]
        if extra_loss is not None:
            for name, value in extra_loss(model, batch, step).items():
                terms[name] = value
                terms["total"] = terms["total"] + value
    total = terms["total"]
    term_norms = _term_gradient_norms(model, contributions) if term_gradients and contributions else {}
    (scaler.scale(total) if scaler is not None else total).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = clip_gradients(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself on inf/NaN gradients
        scaler.update()
    elif math.isfinite(grad_norm):
        optimizer.step()
    else:
        log.warning("step %d: non-finite gradient norm, optimiser step skipped", step)
    out_terms = {("loss" if k == "total" else k): float(v.detach()) for k, v in terms.items()}
    out_terms["grad_norm"] = grad_norm
    out_terms.update({k: float(v) for k, v in weights.items()})
    out_terms.update(term_norms)
    return out_terms


def _term_gradient_norms(model: nn.Module, contributions: dict[str, torch.Tensor]) -> dict[str, float]:
    """Gradient norm of each loss term on its own (autograd.grad, the graph kept for the real
    backward) and its share of their sum. Not under DDP: its reducer does not see autograd.grad."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return {}
    params = [p for p in model.parameters() if p.requires_grad]
    norms: dict[str, float] = {}
    for name, value in contributions.items():
        if not value.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(value.float(), params, retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    total = sum(norms.values())
    out = {f"grad_norm_{k}": v for k, v in norms.items()}
    out.update({f"grad_share_{k}": (v / total if total > 0 else 0.0) for k, v in norms.items()})
    return out
