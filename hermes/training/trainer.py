"""``train(config)``: the training loop, kept short; the parts live in their own modules.

    plan.py         checks + data (catalog, cache, splits) + model smoke test + model bundle
    loss.py         partial-label BCE + Dice, modality CE, deep supervision
    optim.py        LAMB / AdamW / SGD, clipping, warm-up + poly/cosine schedule
    precision.py    autocast dtype, GradScaler, channels_last
    ema.py          the EMA model (validated, saved as the final weights)
    medcontext.py   optional masked-context pass + teacher
    checkpoint.py   atomic tensor-only checkpoints
    distributed.py  torchrun/DDP context
    validation.py   per-dataset Dice on held-out cases
    logger.py       CSV, TensorBoard, progress.png

A step ``s`` (0-based) uses batch ``s`` of the loader (a pure function of seed, rank and s),
the learning rate ``lr_factor(s)`` and updates the EMA with the warm-up of step ``s``; a
checkpoint after ``n`` steps stores everything else (weights, EMA, optimiser, scheduler, scaler,
MedContext teacher, RNGs), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hermes.bundle import migrate_model_config
from hermes.config import TrainConfig, dump_config
from hermes.data.cache import load_cached_case
from hermes.data.cache_lock import read_lock
from hermes.data.loader import make_train_loader
from hermes.data.sampling import model_data_config
from hermes.errors import ConfigError
from hermes.fileio import atomic_write_text
from hermes.models.registry import network_spec, save_model
from hermes.runtime import AmpSettings, ThreadTuner, resolve_amp, to_device
from hermes.training.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from hermes.training.distributed import DistContext, init_distributed, shutdown_distributed, wrap_model
from hermes.training.ema import ModelEMA, unwrap
from hermes.training.logger import TrainLogger
from hermes.training.loss import HermesLoss
from hermes.training.optim import build_optimizer, build_scheduler, set_schedule_position
from hermes.training.plan import (
    RunData,
    build_checked_model,
    check_output,
    check_patch,
    load_data,
    model_bundle,
)
from hermes.training.step import medcontext_generator, train_step
from hermes.training.validation import Validator, mean_dice

log = logging.getLogger(__name__)

MODEL_DIR = "model"
# Sections whose change makes a checkpoint unusable (shapes or the meaning of the weights).
_RESUME_SECTIONS = ("model", "paradigm", "dataset")


@dataclass
class TrainResult:
    output: Path
    model_dir: Path
    steps: int
    val_dice: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # total loss of every step run by this call


# ----------------------------------------------------------------------------------------------
# Set-up helpers
# ----------------------------------------------------------------------------------------------
def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """CPU kernels are already deterministic for a fixed thread count (and the call below
    imports torch's compiler stack, ~8 s), so the switch matters, and is made, on CUDA only."""
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic and device.type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = config.model_dump(mode="json")
    # a checkpoint written before a model key existed holds the value that rebuilds its network
    saved = {**saved, "model": migrate_model_config(saved.get("model") or {})}
    changed = [key for key in _RESUME_SECTIONS if saved.get(key) != current.get(key)]
    if saved.get("data", {}).get("patch_size") != current["data"]["patch_size"]:
        changed.append("data.patch_size")
    if changed:
        raise ConfigError(
            f"cannot resume {path}: the config changed {', '.join(changed)} since the checkpoint was written"
        )


def _thread_tuner(config: TrainConfig, ctx: DistContext) -> ThreadTuner | None:
    """A fixed ``cpu_threads`` is set here; "auto" tunes between the threads the process was
    given and one fewer, on CPU, in a single process, unless the run must be deterministic."""
    if ctx.device.type != "cpu":
        return None
    if config.cpu_threads != "auto":
        torch.set_num_threads(config.cpu_threads)
        return None
    tuner = ThreadTuner(torch.get_num_threads())
    return tuner if tuner.enabled and ctx.world_size == 1 and not config.deterministic else None


def _make_medcontext(config: TrainConfig, model: nn.Module, data: RunData, ema: ModelEMA) -> Any | None:
    if not config.medcontext.enabled:
        return None
    from hermes.training.medcontext import MedContext

    return MedContext(config.medcontext, model, data.catalog.task_names, ema=ema)


def _validator(config: TrainConfig, data: RunData, ctx: DistContext, amp: AmpSettings) -> Validator:
    return Validator(
        data.catalog,
        lambda dataset, case_id: load_cached_case(config.cache, dataset, case_id),
        data.val_cases,
        config.validation,
        config.data.patch_size,
        ctx.device,
        precision=amp.name,
        channels_last=amp.channels_last,
    )


def choose_final_weights(
    config: TrainConfig, model: nn.Module, ema: ModelEMA, validator: Validator, ema_dice: dict[str, float]
) -> tuple[nn.Module, str, dict[str, dict[str, float]]]:
    """The module to save, its name ("ema" or "raw") and the validation Dice of each candidate.

    ``final_weights: best`` validates the raw weights once more (the EMA was validated at the
    last step) and keeps the higher mean; ties go to the EMA. Measured at short CPU budgets the
    raw weights often win (the EMA still carries early weights); at long budgets the EMA does.
    """
    raw = unwrap(model)
    if config.final_weights == "raw":
        return raw, "raw", {}
    if config.final_weights == "ema" or not validator.enabled:
        return ema.module, "ema", {"ema": ema_dice} if ema_dice else {}
    scores = {"ema": ema_dice or validator(ema.module), "raw": validator(raw)}
    ema_mean, raw_mean = mean_dice(scores["ema"]), mean_dice(scores["raw"])
    if math.isfinite(raw_mean) and (not math.isfinite(ema_mean) or raw_mean > ema_mean):
        return raw, "raw", scores
    return ema.module, "ema", scores


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    resume: bool = False,
    extend_steps: int | None = None,
    progress: bool = True,
    device: str | None = None,
) -> TrainResult:
    """Train from ``config`` (or continue its run with ``resume``; ``extend_steps`` plans N more
    steps past the checkpoint's schedule and implies ``resume``). Works under torchrun.
    ``device``: "cpu", "cuda", "cuda:N" or None/"auto" (CUDA when available); a machine choice,
    not part of the config, so a run can resume on another machine."""
    ctx = init_distributed(device=device)
    try:
        with read_lock(config.cache):  # never read a cache that `hermes prepare` is writing
            return _train(config, ctx, resume or extend_steps is not None, extend_steps or 0, progress)
    finally:
        shutdown_distributed(ctx)


def _train(config: TrainConfig, ctx: DistContext, resume: bool, extend_steps: int, progress: bool) -> TrainResult:
    out = Path(config.output)
    check_output(out, resume)
    check_patch(config)
    data = load_data(config)
    amp = resolve_amp(config.precision, config.channels_last, ctx.device)
    configure_determinism(config.deterministic, ctx.device)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model, unused = build_checked_model(config, data, ctx.device, amp)
    ema = ModelEMA(model, config.medcontext.teacher_momentum if config.medcontext.reuse_validation_ema
                   and config.medcontext.enabled else config.ema_decay)
    optimizer = build_optimizer(model, config.optim)
    scaler = amp.make_scaler()
    medcontext = _make_medcontext(config, model, data, ema)
    loss_fn = HermesLoss(config.loss)

    start, total_steps = 0, config.steps
    rng_state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(checkpoint_path(out), map_location=ctx.device)
        _check_resumable(state["config"], config, checkpoint_path(out))
        start, total_steps = int(state["step"]), int(state["total_steps"]) + extend_steps
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if medcontext is not None and state.get("medcontext") is not None:
            medcontext.load_state_dict(state["medcontext"])
        rng_state = state["rng"]
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    if medcontext is not None:
        medcontext.set_total_steps(total_steps)  # the cosine teacher momentum spans the planned run
    set_schedule_position(scheduler, start)
    if not (config.medcontext.enabled and config.medcontext.reuse_validation_ema):
        ema.cap_window(total_steps, config.ema_window_fraction)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(config))
    if not ctx.is_main:
        torch.manual_seed(config.seed + 1000 * ctx.rank + start)

    tuner = _thread_tuner(config, ctx)
    net = wrap_model(model, ctx, find_unused=bool(unused))
    if config.compile:
        # the EMA, the checkpoints and validation keep using the plain `model` (same parameters)
        net = torch.compile(net)
    loader = make_train_loader(
        data.catalog, config.cache, model_data_config(config.data, config.model), config.seed, ctx.rank, ctx.world_size, start, cases=data.train_cases
    )
    logger = TrainLogger(out, enabled=ctx.is_main, resume_step=start if resume else None)
    validator = _validator(config, data, ctx, amp)
    val_dice: dict[str, float] = {}
    losses: list[float] = []
    window: list[dict[str, float]] = []
    tick = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not (progress and ctx.is_main))
    step = start
    batches = iter(loader)
    if rng_state is not None and ctx.is_main:
        # Last thing before the loop: creating the loader's iterator draws from torch's global
        # generator, so restoring earlier would leave it one draw off the uninterrupted run.
        restore_rng_state(rng_state)
    try:
        while step < total_steps:
            batch = to_device(next(batches), ctx.device, amp.channels_last)
            step_start = time.perf_counter()
            generator = medcontext_generator(config.seed, ctx.rank, step) if medcontext is not None else None
            lr = optimizer.param_groups[0]["lr"]
            every = config.medcontext.term_gradients_every
            terms = train_step(net, batch, loss_fn, optimizer, amp, scaler, config.optim.grad_clip,
                               medcontext, generator, step,
                               term_gradients=medcontext is not None and every is not None and step % every == 0)
            ema.update(model, step)
            if medcontext is not None:
                medcontext.update_teacher(model, step)
            scheduler.step()
            threads = tuner.step_done(step, time.perf_counter() - step_start) if tuner is not None else None
            step += 1
            losses.append(terms["loss"])
            window.append({**terms, "lr": lr} | ({"threads": float(threads)} if threads is not None else {}))
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}", refresh=False)
            if step % config.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - tick
                # keys measured on some steps only (grad_share_*) are averaged where present
                keys = dict.fromkeys(k for w in window for k in w)
                row = {k: float(np.mean([w[k] for w in window if k in w])) for k in keys}
                row["steps_per_s"] = len(window) / max(elapsed, 1e-9)
                logger.log_train(step, row)
                window, tick = [], time.perf_counter()
            if validator.enabled and (step % config.validation.every_steps == 0 or step == total_steps):
                if ctx.is_main:
                    val_dice = validator(ema.module)
                    logger.log_validation(step, val_dice)
                    bar.write(f"step {step}: validation Dice {mean_dice(val_dice):.3f} "
                              + " ".join(f"{k}={v:.3f}" for k, v in val_dice.items()))
                tick = time.perf_counter()  # validation time is not training speed
            if ctx.is_main and (step % config.checkpoint_every == 0 or step == total_steps):
                save_checkpoint(checkpoint_path(out), {
                    "step": step,
                    "total_steps": total_steps,
                    "model": unwrap(model).state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "medcontext": medcontext.state_dict() if medcontext is not None else None,
                    "rng": capture_rng_state(),
                    "config": config.model_dump(mode="json"),
                })
    finally:
        bar.close()
        del batches
        logger.close()

    model_dir = out / MODEL_DIR
    if ctx.is_main:
        final, chosen, scores = choose_final_weights(config, model, ema, validator, val_dice)
        bundle = model_bundle(
            config, data, step, amp, scores.get(chosen, val_dice), network_spec(final), chosen, scores
        )
        if scores:
            log.info("final weights: %s (validation Dice %s)", chosen,
                     ", ".join(f"{name} {mean_dice(d):.4f}" for name, d in scores.items()))
        save_model(model_dir, final, bundle, catalog_yaml=data.catalog.to_yaml())
    ctx.barrier()
    return TrainResult(out, model_dir, step, val_dice, losses)
