"""What the context priors learned: similarity of task and modality tokens, and of prototypes.

The paper claims the learned priors "reflect anatomical and imaging relations". This module
measures it on a trained model, with cosine similarities between

* **task priors**, per fusion stage (each stage owns an independent pool at its width) and over
  all stages (the per-stage unit vectors concatenated, so every stage weighs the same whatever
  its width: the mean of the per-stage cosines);
* **modality priors**, per stage and over all stages (the L tokens of a modality averaged);
* **prototypes**, the vectors that actually produce the masks. A prototype is the prototype
  head applied to a task's *posterior* tokens, which depend on the image. Two versions:

  - ``static``: the head applied to the raw (pre-fusion) priors, i.e. the prototype a task
    would have if the fusion blocks did not update its tokens. Needs no data; it shows how the
    head maps the prior space, not what a real image produces.
  - ``posterior`` (when a cache is given): the head applied to the real posteriors, averaged
    over a few cached cases of each dataset that has the task, each queried with its dataset's
    task list and modality exactly as in training (a patch around the labelled region).

Why cosine: the dot product of a prototype with the decoder features is the mask logit, so the
direction is what distinguishes tasks; the norm mostly scales confidence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hermes.errors import ModelError
from hermes.evaluation.similarity import (
    SimilarityMatrix,
    cluster_order,
    cosine_similarity,
    nearest_neighbours,
    same_structure_neighbour_rate,
    write_csv,
    write_heatmap,
)
from hermes.fileio import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolView:
    stage: str
    task_tokens: Tensor  # (T + 1, C), row T = NULL
    modality_tokens: Tensor | None  # (M + 1, L, C), entry M = UNKNOWN


def _find(model: nn.Module, kind: type[nn.Module]) -> nn.Module | None:
    """The model's module of that type (``prototype_head`` first: deep-supervision heads are
    PrototypeHeads too)."""
    named = getattr(model, "prototype_head", None)
    if isinstance(named, kind):
        return named
    for module in model.modules():
        if isinstance(module, kind):
            return module
    return None


def prior_pools(model: nn.Module) -> list[PoolView]:
    """The pools of every fusion stage, in stage order; raises for a model without priors."""
    from hermes.models.priors import ContextPriors

    priors = _find(model, ContextPriors)
    if priors is None:
        raise ModelError("this model has no context priors (a traditional baseline?): nothing to analyse")
    views = []
    for stage, pool in priors.pools.items():  # type: ignore[union-attr]
        modality = pool.modality_tokens.detach().float().cpu() if pool.modality_tokens is not None else None
        views.append(PoolView(stage, pool.task_tokens.detach().float().cpu(), modality))
    return views


def _unit_concat(blocks: Sequence[Tensor]) -> np.ndarray:
    parts = []
    for block in blocks:
        array = block.numpy().astype(np.float64)
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        parts.append(np.divide(array, norms, out=np.zeros_like(array), where=norms > 0))
    return np.concatenate(parts, axis=1)


def prototype_stage_indices(model: nn.Module, pools: list[PoolView]) -> list[int] | None:
    """Which stages' task tokens the prototype head concatenates (all, or the last one)."""
    from hermes.models.heads import PrototypeHead

    head = _find(model, PrototypeHead)
    if head is None:
        return None
    names = [view.stage for view in pools]
    declared = getattr(model, "prototype_stages", None)  # HermesModel says which stages it uses
    if declared is not None and all(stage in names for stage in declared):
        return [names.index(stage) for stage in declared]
    # A module that does not declare them (e.g. wrapped): match the head's input width.
    in_dim = int(head.norm.normalized_shape[0])  # type: ignore[union-attr]
    widths = [view.task_tokens.shape[1] for view in pools]
    if in_dim == sum(widths):
        return list(range(len(pools)))
    if in_dim == widths[-1]:
        return [len(pools) - 1]
    log.warning("prototype head input %d matches neither all stages nor the last one; skipping prototypes", in_dim)
    return None


@torch.no_grad()
def static_prototypes(model: nn.Module, pools: list[PoolView], num_tasks: int) -> np.ndarray | None:
    """The prototype head applied to the raw task priors: (T, D), or None without a head."""
    from hermes.models.heads import PrototypeHead

    head = _find(model, PrototypeHead)
    stages = prototype_stage_indices(model, pools)
    if head is None or stages is None:
        return None
    param = next(head.parameters())
    tokens = [pools[i].task_tokens[:num_tasks].unsqueeze(0).to(param.device, param.dtype) for i in stages]
    return head.prototypes(tokens)[0].float().cpu().numpy()  # type: ignore[operator]


def _patch_around(image: np.ndarray, label: np.ndarray | None, patch: Sequence[int]) -> np.ndarray:
    """A patch of ``patch`` voxels centred on the labelled region's box (image centre if none),
    padded where the volume is smaller with each channel's minimum (the cache's pad value, what
    training pads with)."""
    spatial = image.shape[1:]
    if label is not None and label.any():
        coords = np.argwhere(label > 0)
        centre = (coords.min(0) + coords.max(0)) // 2
    else:
        centre = np.array(spatial) // 2
    minimum = np.asarray(image).reshape(image.shape[0], -1).min(axis=1).astype(np.float32)
    out = np.broadcast_to(minimum[:, None, None, None], (image.shape[0], *patch)).copy()
    src, dst = [], []
    for axis, size in enumerate(patch):
        start = int(centre[axis]) - size // 2
        lo, hi = max(start, 0), min(start + size, spatial[axis])
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


@torch.no_grad()
def posterior_prototypes(
    model: nn.Module,
    catalog: Any,
    cache: Path,
    patch_size: Sequence[int],
    cases_per_dataset: int = 3,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean posterior prototype per task over cached cases: ((T, D), counts (T,)).

    ``catalog`` is the model's catalog (task ids of each dataset); only datasets present in the
    cache are used. The prototypes are captured from the prototype head's own inputs with a
    forward pre-hook, so no model code needs to expose them.
    """
    from hermes.models.channel_stem import channel_inputs
    from hermes.models.heads import PrototypeHead

    head = _find(model, PrototypeHead)
    if head is None:
        return None
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(module.prototypes(args[0]).float().cpu())  # type: ignore[operator]

    handle = head.register_forward_pre_hook(hook)
    model.eval()
    sums: np.ndarray | None = None
    counts = np.zeros(catalog.num_tasks, dtype=np.int64)
    try:
        for entry in catalog.datasets:
            folder = Path(cache) / entry.name
            if not folder.is_dir():
                continue
            case_dirs = sorted(p for p in folder.iterdir() if (p / "image.npy").is_file())[:cases_per_dataset]
            for case_dir in case_dirs:
                image = np.load(case_dir / "image.npy", mmap_mode="r")
                label_path = case_dir / "label.npy"
                label = np.load(label_path, mmap_mode="r") if label_path.is_file() else None
                patch = torch.from_numpy(_patch_around(np.asarray(image, dtype=np.float32), label, patch_size))
                task_ids = torch.tensor([entry.task_ids], dtype=torch.long, device=device)
                modality = torch.tensor([entry.modality_id], dtype=torch.long, device=device)
                channels = {
                    "channel_ids": torch.tensor([catalog.channel_modality_ids(entry)], dtype=torch.long, device=device),
                    "channel_mask": torch.ones((1, entry.num_channels), dtype=torch.bool, device=device),
                }
                captured.clear()
                model(patch.unsqueeze(0).to(device), task_ids, modality, **channel_inputs(model, channels))
                if not captured:
                    continue
                protos = captured[-1][0].numpy().astype(np.float64)  # (T_req, D)
                if sums is None:
                    sums = np.zeros((catalog.num_tasks, protos.shape[1]))
                for slot, task_id in enumerate(entry.task_ids):
                    sums[task_id] += protos[slot]
                    counts[task_id] += 1
    finally:
        handle.remove()
    if sums is None:
        return None
    mean = np.divide(sums, np.maximum(counts, 1)[:, None])
    return mean, counts


def similarity_matrices(
    model: nn.Module,
    task_names: list[str],
    modality_names: list[str],
    posterior: np.ndarray | None = None,
    posterior_counts: np.ndarray | None = None,
    used_modalities: Sequence[int] | None = None,
) -> list[SimilarityMatrix]:
    """All matrices of a model (see the module docstring). ``used_modalities``: modality ids
    (unknown = M) of the catalog's datasets; the modality plots keep only those."""
    pools = prior_pools(model)
    num_tasks = len(task_names)
    if pools[0].task_tokens.shape[0] != num_tasks + 1:
        raise ModelError(
            f"the model has {pools[0].task_tokens.shape[0] - 1} task priors but its spec names {num_tasks} tasks"
        )
    labels = tuple(task_names)
    out: list[SimilarityMatrix] = []
    for view in pools:
        out.append(
            SimilarityMatrix(
                f"task_prior_{view.stage}",
                f"Task priors, stage {view.stage} (C={view.task_tokens.shape[1]})",
                labels,
                cosine_similarity(view.task_tokens[:num_tasks].numpy()),
            )
        )
    out.append(
        SimilarityMatrix(
            "task_prior_all",
            "Task priors, all stages",
            labels,
            cosine_similarity(_unit_concat([v.task_tokens[:num_tasks] for v in pools])),
        )
    )
    if pools[0].modality_tokens is not None:
        # Only modalities some dataset trained (the vocabulary's other rows are untouched
        # random initialisations and would only add noise to the plot).
        rows = list(range(len(modality_names) + 1))
        if used_modalities is not None and len(set(used_modalities)) >= 2:
            rows = sorted(set(used_modalities))
        all_labels = (*modality_names, "unknown")
        modality_labels = tuple(all_labels[i] for i in rows)
        means = [v.modality_tokens.mean(dim=1)[rows] for v in pools if v.modality_tokens is not None]
        for view, mean in zip(pools, means):
            out.append(
                SimilarityMatrix(
                    f"modality_prior_{view.stage}",
                    f"Modality priors (token mean), stage {view.stage}",
                    modality_labels,
                    cosine_similarity(mean.numpy()),
                )
            )
        out.append(
            SimilarityMatrix(
                "modality_prior_all", "Modality priors (token mean), all stages", modality_labels,
                cosine_similarity(_unit_concat(means)),
            )
        )
    static = static_prototypes(model, pools, num_tasks)
    if static is not None:
        out.append(
            SimilarityMatrix(
                "task_prototype_static",
                "Prototypes of the raw priors (head applied without fusion)",
                labels,
                cosine_similarity(static),
            )
        )
    if posterior is not None:
        keep = np.arange(num_tasks) if posterior_counts is None else np.flatnonzero(posterior_counts > 0)
        out.append(
            SimilarityMatrix(
                "task_prototype_posterior",
                "Posterior prototypes (mean over cached cases)",
                tuple(task_names[i] for i in keep),
                cosine_similarity(posterior[keep]),
            )
        )
    return out


def write_analysis(
    matrices: list[SimilarityMatrix], out_dir: str | Path, order: str = "catalog"
) -> dict[str, Any]:
    """CSV + PNG per matrix and ``summary.json`` (neighbours, same-structure rate)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"order": order, "matrices": {}}
    for sim in matrices:
        write_csv(out_dir / f"{sim.name}.csv", sim)
        write_heatmap(out_dir / f"{sim.name}.png", sim, cluster_order(sim.matrix) if order == "cluster" else None)
        entry: dict[str, Any] = {
            "title": sim.title,
            "labels": list(sim.labels),
            "nearest": {label: [[n, round(v, 4)] for n, v in nbrs] for label, nbrs in nearest_neighbours(sim)},
        }
        if sim.name.startswith("task_"):
            rate, chance, counted = same_structure_neighbour_rate(sim)
            entry["same_structure_nearest_rate"] = None if counted == 0 else round(rate, 4)
            entry["same_structure_chance_rate"] = None if counted == 0 else round(chance, 4)
            entry["tasks_with_a_same_structure_partner"] = counted
        summary["matrices"][sim.name] = entry
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
