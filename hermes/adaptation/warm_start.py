"""Warm-start a model with more tasks/modalities from a trained one, and freeze its backbone.

A Hermes model's only task- or modality-sized parameters are the prior pools of every fusion
stage (``task_tokens`` (T + 1, C), row T = NULL; ``modality_tokens`` (M + 1, L, C), entry M =
UNKNOWN), the modality classifier's last layer (M outputs) and, with ``channel_fusion: mean``,
the per-channel stem's modality FiLM table (``channel_embedding``, (M + 1, 2w), row M = UNKNOWN,
grown like the modality pools). Everything else (backbone,
fusion blocks, prototype head) has the same shape whatever T and M are, so it is copied as is.

Old rows are copied **bit-exactly** to the same ids (the merged catalog keeps old ids), NULL
and UNKNOWN move to the new last row, and the added rows start as configured
(:class:`hermes.config.WarmStartConfig`): the mean of the old real rows (plus 10% of a fresh
random row, so that several new tasks do not start as identical tokens), the fresh Xavier
initialisation of the new model, or a copy of a named existing row. A new modality's
classifier row always starts fresh (a class weight copied from another class would make the
two indistinguishable for the modality loss).

Traditional baselines own one output channel per task of their dataset; when the task set
changes, their output layer (the only parameters whose shape depends on it) is re-initialised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from hermes.config import WarmStartConfig
from hermes.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

TASK_POOL_SUFFIX = "task_tokens"
# Tensors with one row per task id + the null row, grown like the task token pools.
TASK_ROW_SUFFIXES = (TASK_POOL_SUFFIX, "logit_calibration.log_scale", "logit_calibration.bias")
MODALITY_POOL_SUFFIX = "modality_tokens"
# Tensors with one row per modality id + the unknown row, grown like the modality token pools.
MODALITY_ROW_SUFFIXES = (MODALITY_POOL_SUFFIX, "channel_embedding.weight")
MEAN_INIT_JITTER = 0.1


@dataclass(frozen=True)
class RowSource:
    """Where an added pool row comes from: ``mean`` / ``random`` / ``copy`` of ``source``."""

    kind: str
    source: int | None = None

    def describe(self, names: list[str]) -> str:
        if self.kind == "copy" and self.source is not None:
            return f"copy of {names[self.source]}"
        return self.kind


@dataclass
class WarmStartPlan:
    """Old -> new sizes and, for every added row, where it starts."""

    old_num_tasks: int
    new_num_tasks: int
    old_num_modalities: int
    new_num_modalities: int
    task_rows: dict[int, RowSource] = field(default_factory=dict)  # added task id -> source
    modality_rows: dict[int, RowSource] = field(default_factory=dict)  # added modality id -> source


def _row_source(
    name: str,
    init: str,
    explicit: dict[str, str],
    resolve_old: Callable[[str], int],
    what: str,
) -> RowSource:
    if name in explicit:
        return RowSource("copy", resolve_old(explicit[name]))
    if init == "copy":
        raise ConfigError(
            f"warm_start.{what}_init is 'copy' but warm_start.{what}_from has no entry for new {what} {name!r}"
        )
    return RowSource(init)


def plan_warm_start(
    old_task_names: list[str],
    new_task_names: list[str],
    old_modalities: list[str],
    new_modalities: list[str],
    config: WarmStartConfig,
) -> WarmStartPlan:
    """Decide the source of every added row. Old names must be a prefix of the new lists."""
    if new_task_names[: len(old_task_names)] != old_task_names:
        raise ModelError("internal: the merged catalog must keep the old tasks first, in order")
    if new_modalities[: len(old_modalities)] != old_modalities:
        raise ModelError("internal: the merged catalog must keep the old modalities first, in order")

    def resolver(names: list[str], what: str) -> Callable[[str], int]:
        def resolve(name: str) -> int:
            if name in names:
                return names.index(name)
            short = [i for i, n in enumerate(names) if n.rsplit("/", 1)[-1] == name]
            if len(short) == 1:
                return short[0]
            hint = "ambiguous" if short else "not a"
            raise ConfigError(
                f"warm_start.{what}_from: {name!r} is {hint} {what} of the base model; it has: {', '.join(names)}"
            )

        return resolve

    added_tasks = new_task_names[len(old_task_names) :]
    added_modalities = new_modalities[len(old_modalities) :]
    for what, explicit, added in (
        ("task", config.task_from, added_tasks),
        ("modality", config.modality_from, added_modalities),
    ):
        unknown = sorted(set(explicit) - set(added))
        if unknown:
            raise ConfigError(
                f"warm_start.{what}_from names {', '.join(map(repr, unknown))}, which are not new {what}s "
                f"(new: {', '.join(added) or 'none'})"
            )
    plan = WarmStartPlan(len(old_task_names), len(new_task_names), len(old_modalities), len(new_modalities))
    task_resolve = resolver(old_task_names, "task")
    for offset, name in enumerate(added_tasks):
        plan.task_rows[len(old_task_names) + offset] = _row_source(
            name, config.task_init, config.task_from, task_resolve, "task"
        )
    modality_resolve = resolver(old_modalities, "modality")
    for offset, name in enumerate(added_modalities):
        plan.modality_rows[len(old_modalities) + offset] = _row_source(
            name, config.modality_init, config.modality_from, modality_resolve, "modality"
        )
    return plan


def _grow_pool(old: Tensor, fresh: Tensor, old_real: int, new_real: int, rows: dict[int, RowSource]) -> Tensor:
    """Pool of ``new_real`` + 1 rows: old real rows, added rows per ``rows``, old last row last."""
    out = fresh.clone()
    out[:old_real] = old[:old_real]
    out[new_real] = old[old_real]
    mean = old[:old_real].mean(dim=0) if old_real > 0 else fresh[0]
    for index, source in rows.items():
        if source.kind == "mean":
            # + 10% of the fresh row: several new tasks must not start as identical tokens.
            out[index] = mean + MEAN_INIT_JITTER * fresh[index]
        elif source.kind == "copy":
            out[index] = old[int(source.source)]  # type: ignore[arg-type]
        # "random": keep the fresh initialisation
    return out


def warm_start_state(
    old_state: dict[str, Tensor],
    new_state: dict[str, Tensor],
    plan: WarmStartPlan,
    reinit_mismatched: bool = False,
) -> tuple[dict[str, Tensor], list[str]]:
    """The new model's state dict filled from the old one; returns it and the re-initialised keys.

    ``new_state`` is the freshly built model's state (its values are the "random" rows).
    Parameters missing from the old state or with an unexpected shape are an error unless
    ``reinit_mismatched`` (traditional models' output layers), in which case they keep their
    fresh values and are listed.
    """
    out: dict[str, Tensor] = {}
    reinitialised: list[str] = []
    for key, fresh in new_state.items():
        old = old_state.get(key)
        if old is None:
            if not reinit_mismatched:
                raise ModelError(f"base model has no parameter {key!r}: different architecture?")
            out[key] = fresh.clone()
            reinitialised.append(key)
            continue
        is_pool = key.endswith((*TASK_ROW_SUFFIXES, *MODALITY_ROW_SUFFIXES))
        if is_pool and old.shape[1:] != fresh.shape[1:]:
            raise ModelError(
                f"prior pool {key!r} has token shape {tuple(old.shape[1:])} in the base model and "
                f"{tuple(fresh.shape[1:])} in the new one: different architecture"
            )
        if key.endswith(TASK_ROW_SUFFIXES) and old.shape[0] == plan.old_num_tasks + 1:
            out[key] = _grow_pool(old, fresh, plan.old_num_tasks, plan.new_num_tasks, plan.task_rows)
        elif key.endswith(MODALITY_ROW_SUFFIXES) and old.shape[0] == plan.old_num_modalities + 1:
            out[key] = _grow_pool(
                old, fresh, plan.old_num_modalities, plan.new_num_modalities, plan.modality_rows
            )
        elif old.shape == fresh.shape:
            out[key] = old.detach().clone().to(fresh.dtype)
        elif (
            old.shape[1:] == fresh.shape[1:]
            and old.shape[0] == plan.old_num_modalities
            and fresh.shape[0] == plan.new_num_modalities
        ):
            # The modality classifier's output layer: old classes copied, new ones fresh.
            grown = fresh.clone()
            grown[: plan.old_num_modalities] = old
            out[key] = grown
        elif reinit_mismatched:
            out[key] = fresh.clone()
            reinitialised.append(key)
        else:
            raise ModelError(
                f"parameter {key!r} has shape {tuple(old.shape)} in the base model and "
                f"{tuple(fresh.shape)} in the new one, and is not a task/modality pool"
            )
    extra = sorted(set(old_state) - set(new_state))
    if extra and not reinit_mismatched:
        raise ModelError(f"base model has parameters the new model lacks: {', '.join(extra[:5])}")
    return out, reinitialised


# --------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------
def _context_module_types() -> tuple[type[nn.Module], ...]:
    from hermes.models.fusion import PriorFusion
    from hermes.models.heads import ModalityHead, PrototypeHead, TaskLogitCalibration
    from hermes.models.priors import ContextPriors, PriorPool

    return (ContextPriors, PriorPool, PriorFusion, PrototypeHead, ModalityHead, TaskLogitCalibration)


def context_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the priors, the fusion blocks and the heads."""
    types = _context_module_types()
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, types):
            for name, _ in module.named_parameters(prefix=prefix):
                names.add(name)
    return names


def freeze_backbone(model: nn.Module) -> list[str]:
    """``requires_grad=False`` on every parameter outside priors/fusion/heads; returns their names.

    Raises for a model without context modules (a traditional baseline has nothing left to
    train once its backbone is frozen).
    """
    context = context_parameter_names(model)
    if not context:
        raise ConfigError("freeze: backbone needs a Hermes model (priors, fusion, heads); this model has none")
    frozen = []
    for name, parameter in model.named_parameters():
        if name not in context:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def frozen_norm_modules(model: nn.Module, frozen: Iterable[str]) -> list[nn.Module]:
    """Normalisation layers with running statistics whose parameters are all frozen.

    They must stay in eval mode during training, or their running mean/var (part of the
    "backbone weights") would drift although no gradient touches them.
    """
    frozen = set(frozen)
    out = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            names = [n for n, _ in module.named_parameters(prefix=prefix)]
            if all(n in frozen for n in names):
                out.append(module)
    return out


def state_fingerprint(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """Detached copies of the named parameters/buffers (tests and the freeze self-check)."""
    wanted = set(names)
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in wanted if name in state}


def describe_plan(plan: WarmStartPlan, task_names: list[str], modality_names: list[str]) -> list[str]:
    """Human lines: one per added row and its source."""
    lines = [f"task {task_names[i]} (id {i}): {src.describe(task_names)}" for i, src in plan.task_rows.items()]
    lines += [
        f"modality {modality_names[i]} (id {i}): {src.describe(modality_names)}"
        for i, src in plan.modality_rows.items()
    ]
    return lines
