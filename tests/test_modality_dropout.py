"""Modality-prompt dropout: the rate it happens at, determinism, and that the loss keeps the truth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hermes.config import AugmentConfig, DataConfig, LossConfig
from hermes.data.cache import open_cache
from hermes.data.catalog import load_catalog
from hermes.data.sampling import PatchSampler, modality_prompt, training_cases
from hermes.runtime import AmpSettings
from hermes.training.loss import HermesLoss
from hermes.training.step import train_step


def _sampler(small_cache: tuple[Path, Path], rate: float, seed: int = 0) -> PatchSampler:
    catalog_path, cache = small_cache
    cfg = DataConfig(
        patch_size=[16, 16, 16], batch_size=8, num_workers=0, modality_dropout=rate,
        augment=AugmentConfig(enabled=False),
    )
    train, _ = training_cases(open_cache(cache), cfg, seed)
    return PatchSampler(load_catalog(catalog_path), str(cache), cfg, train, seed=seed)


def test_dropout_happens_at_the_configured_rate(small_cache) -> None:
    rate, n_batches = 0.3, 40
    sampler = _sampler(small_cache, rate)
    unknown = sampler.catalog.unknown_modality_id
    dropped = total = 0
    for index in range(n_batches):
        batch = sampler.batch(index)
        true, prompt = batch["modality_id"], batch["modality_prompt_id"]
        known = true != unknown
        # a prompt is either the true modality or the unknown one, never another modality
        assert bool(((prompt == true) | (prompt == unknown)).all())
        dropped += int((prompt[known] == unknown).sum())
        total += int(known.sum())
    assert total >= 200
    sd = math.sqrt(total * rate * (1 - rate))
    assert abs(dropped - rate * total) < 4 * sd, (dropped, total)


def test_dropout_is_part_of_the_reproducible_batch(small_cache) -> None:
    a, b = _sampler(small_cache, 0.5), _sampler(small_cache, 0.5)
    for index in (0, 3):
        assert torch.equal(a.batch(index)["modality_prompt_id"], b.batch(index)["modality_prompt_id"])
    # the patches do not depend on the rate (the dropout is drawn after them)
    off = _sampler(small_cache, 0.0).batch(3)
    on = a.batch(3)
    assert torch.equal(off["image"], on["image"]) and torch.equal(off["modality_id"], on["modality_id"])
    assert torch.equal(off["modality_prompt_id"], off["modality_id"])


def test_modality_prompt_edges_and_range() -> None:
    ids = torch.tensor([0, 1, 2, 3] * 250)
    assert torch.equal(modality_prompt(np.random.default_rng(0), ids, 0.0, 9), ids)
    assert bool((modality_prompt(np.random.default_rng(0), ids, 1.0, 9) == 9).all())
    with pytest.raises(ValueError, match="modality_dropout"):
        DataConfig(modality_dropout=1.5)


@dataclass
class _Out:
    logits: torch.Tensor
    modality_logits: torch.Tensor
    deep_supervision: list[torch.Tensor] = field(default_factory=list)


class _Recorder(nn.Module):
    """A stand-in network that records the modality ids of its prompt."""

    def __init__(self, num_modalities: int) -> None:
        super().__init__()
        self.seg = nn.Conv3d(1, 1, 1)
        self.head = nn.Linear(1, num_modalities)
        self.seen: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor, task_ids: torch.Tensor, modality_id: torch.Tensor, task_mask: object) -> _Out:
        self.seen.append(modality_id.clone())
        logits = self.seg(image).expand(-1, task_ids.shape[1], *image.shape[2:])
        return _Out(logits, self.head(image.mean(dim=(1, 2, 3, 4))[:, None]))


def test_loss_uses_the_true_modality_while_the_prompt_is_dropped() -> None:
    torch.manual_seed(0)
    num_modalities = 4
    model = _Recorder(num_modalities)
    true = torch.tensor([0, 2, 1])
    prompt = torch.tensor([num_modalities, 2, num_modalities])  # two samples dropped to unknown
    batch = {
        "image": torch.randn(3, 1, 8, 8, 8),
        "target": (torch.rand(3, 2, 8, 8, 8) > 0.5).float(),
        "task_ids": torch.zeros(3, 2, dtype=torch.long),
        "task_mask": torch.ones(3, 2, dtype=torch.bool),
        "modality_id": true,
        "modality_prompt_id": prompt,
    }
    with torch.no_grad():
        expected = F.cross_entropy(model.head(batch["image"].mean(dim=(1, 2, 3, 4))[:, None]), true)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    amp = AmpSettings(dtype=None, use_scaler=False, channels_last=False, device_type="cpu")
    terms = train_step(model, batch, HermesLoss(LossConfig(modality_weight=1.0)), optimizer, amp, None, None)
    assert torch.equal(model.seen[0], prompt)
    # the modality term is the cross-entropy against the true modality of every sample
    assert terms["modality"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_training_with_every_prompt_dropped_still_learns_the_modality(small_cache, tmp_path) -> None:
    """End to end through `hermes train`: the prompts are all unknown, the modality loss is not 0
    (it reads the true modality), and the saved model says it was trained for recognition."""
    import csv

    from hermes.config import TrainConfig
    from hermes.inference.modality_guess import trained_for_recognition
    from hermes.models.registry import load_model
    from hermes.training.trainer import train

    catalog, cache = small_cache
    cfg = TrainConfig.model_validate({
        "catalog": str(catalog), "cache": str(cache), "output": str(tmp_path / "run"), "steps": 2, "log_every": 1,
        "checkpoint_every": 2, "precision": "fp32", "model": {"preset": "tiny"}, "optim": {"warmup_steps": 1},
        "data": {"patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0, "val_fraction": 0.0,
                 "modality_dropout": 1.0},
    })
    result = train(cfg, progress=False)
    with (tmp_path / "run" / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(float(row["modality"]) > 0 for row in rows)
    _, bundle = load_model(result.model_dir)
    assert trained_for_recognition(bundle.training) is True
