"""DDP on CPU (gloo, 2 processes): averaged gradients equal the single-process gradients of the
combined batch, even though the two ranks pad their task lists to different lengths."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hermes.config import LossConfig, ModelConfig
from hermes.models.registry import build_model
from hermes.training.distributed import DistContext, find_unused_parameters, wrap_model
from hermes.training.loss import HermesLoss

NUM_TASKS, NUM_MODALITIES, PATCH = 6, 3, 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample(generator: torch.Generator, tasks: list[int], modality: int) -> dict[str, Any]:
    target = torch.zeros(len(tasks), PATCH, PATCH, PATCH)
    for j in range(len(tasks)):  # a non-empty cube per task, so every slot has Dice
        lo = int(torch.randint(0, PATCH // 2, (1,), generator=generator))
        target[j, lo : lo + 9, lo : lo + 8, lo : lo + 7] = 1
    image = torch.randn(1, PATCH, PATCH, PATCH, generator=generator) + target.sum(0, keepdim=True)
    return {"image": image, "target": target, "tasks": tasks, "modality": modality}


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    width = max(len(s["tasks"]) for s in samples)
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "target": torch.zeros(len(samples), width, PATCH, PATCH, PATCH),
        "task_ids": torch.full((len(samples), width), NUM_TASKS),  # null task id pads
        "task_mask": torch.zeros(len(samples), width, dtype=torch.bool),
        "modality_id": torch.tensor([s["modality"] for s in samples]),
    }
    for b, s in enumerate(samples):
        k = len(s["tasks"])
        batch["target"][b, :k] = s["target"]
        batch["task_ids"][b, :k] = torch.tensor(s["tasks"])
        batch["task_mask"][b, :k] = True
    return batch


def _shards() -> list[list[dict[str, Any]]]:
    """Rank 0: two samples with 2 tasks (width 2); rank 1: 3 + 1 tasks (width 3, padded).
    Both ranks hold 4 real (sample, task) pairs and 2 known modalities, so the per-rank means
    average to the mean over the combined batch."""
    g = torch.Generator().manual_seed(0)
    return [
        [_sample(g, [0, 1], 0), _sample(g, [2, 3], 1)],
        [_sample(g, [3, 4, 5], 2), _sample(g, [1], 0)],
    ]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny"), num_tasks=NUM_TASKS, num_modalities=NUM_MODALITIES)


def _grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = model(batch["image"], batch["task_ids"], batch["modality_id"], batch["task_mask"])
    HermesLoss(LossConfig())(out, batch)["total"].backward()
    plain = getattr(model, "module", model)  # DDP prefixes names with "module."
    return {n: p.grad.detach().clone() for n, p in plain.named_parameters() if p.grad is not None}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        ctx = DistContext(rank=rank, world_size=world_size)
        model = _model()
        ddp = wrap_model(model, ctx, find_unused=False)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        grads = _grads(ddp, _collate(_shards()[rank]))
        if ctx.is_main:
            torch.save(grads, Path(out_dir) / "ddp_grads.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process_gradients_of_the_combined_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    model = _model()
    single = _grads(model, _collate(_shards()[0] + _shards()[1]))
    assert find_unused_parameters(model) == []  # so DDP runs without find_unused_parameters
    assert set(ddp) == set(single)
    for name, grad in single.items():
        torch.testing.assert_close(ddp[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_context_without_torchrun_is_single_process(monkeypatch) -> None:
    from hermes.training.distributed import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed()
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, ctx) is model
    assert ctx.all_reduce_mean(torch.tensor(3.0)).item() == 3.0 and ctx.any(True)


def _train_worker(rank: int, world_size: int, port: int, config_json: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    from hermes.config import TrainConfig
    from hermes.training.trainer import train

    train(TrainConfig.model_validate_json(config_json), progress=False)


@pytest.mark.slow
def test_train_under_two_ranks_writes_once(small_cache, tmp_path: Path) -> None:
    """`hermes train` under two ranks, with MedContext (clean + masked halves in one DDP forward)."""
    from hermes.config import TrainConfig
    from hermes.models.registry import load_model

    catalog, cache = small_cache
    config = TrainConfig.model_validate({
        "catalog": str(catalog), "cache": str(cache), "output": str(tmp_path / "run"), "steps": 2,
        "log_every": 1, "precision": "fp32", "model": {"preset": "tiny"},
        "medcontext": {"enabled": True, "mask_patch": [8, 8, 8]},
        "data": {"patch_size": [32, 32, 32], "batch_size": 1, "num_workers": 0, "val_fraction": 0.0},
    })
    mp.spawn(_train_worker, args=(2, _free_port(), config.model_dump_json()), nprocs=2, join=True)
    _, bundle = load_model(tmp_path / "run" / "model")
    assert bundle.training.steps == 2
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 steps, written by rank 0 only
    assert "consistency" in rows[0]
