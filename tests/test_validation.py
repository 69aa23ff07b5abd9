"""Validation Dice conventions (module docstring of hermes/training/validation.py): a (case, task)
pair with both masks empty is skipped, a false positive on a case without the structure is 0,
a dataset's score is the mean over its tasks of the per-task mean over cases."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from hermes.config import ValidationConfig
from hermes.data.catalog import load_catalog
from hermes.data.imageio import save_image
from hermes.evaluation.metrics import dice
from hermes.training.validation import Validator


class Oracle(nn.Module):
    """Segments task t wherever the image (which renders a label map) shows task t's value."""

    def __init__(self, values: list[int]) -> None:
        super().__init__()
        self.values = values

    def forward(self, image, task_ids, modality_id, task_mask=None):
        logits = torch.stack([torch.where(image[:, 0] == v, 10.0, -10.0) for v in self.values], dim=1)
        return SimpleNamespace(logits=logits)


@pytest.fixture
def catalog(tmp_path: Path):
    folder = tmp_path / "Dataset950_Two"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2},
        "file_ending": ".nii.gz", "numTraining": 1,
    }))
    save_image(folder / "imagesTr" / "x_0000.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
    save_image(folder / "labelsTr" / "x.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"datasets": [{"path": str(folder)}]}))
    return load_catalog(tmp_path / "c.yaml")


def case(label: np.ndarray, shown: np.ndarray | None = None) -> SimpleNamespace:
    """A cached case whose image shows ``shown`` (default: the label itself)."""
    image = (label if shown is None else shown).astype(np.float32)[None]
    return SimpleNamespace(image=image, label=label)


def score(catalog, cases: dict[str, SimpleNamespace]) -> float:
    validator = Validator(
        catalog, lambda dataset, case_id: cases[case_id], {"Two": list(cases)},
        ValidationConfig(mode="full", max_cases_per_dataset=10), [16, 16, 16], torch.device("cpu"),
    )
    return validator(Oracle([1, 2]))["Two"]


def test_empty_vs_empty_is_skipped_not_zero(catalog) -> None:
    both = np.zeros((20, 18, 16), np.uint8)
    both[2:9, 3:10, 2:8] = 1
    both[12:18, 8:15, 9:14] = 2
    only_a = np.zeros_like(both)
    only_a[4:12, 4:12, 4:12] = 1
    # Perfect predictions; structure b is absent from only_a and (correctly) not predicted:
    # that pair says nothing, so the score is 1, not (1 + (1 + 0) / 2) / 2.
    assert score(catalog, {"both": case(both), "only_a": case(only_a)}) == pytest.approx(1.0)
    assert math.isnan(dice(np.zeros(5, bool), np.zeros(5, bool)))
    # A false positive on a case without the structure is 0 (b: mean of 1 and 0).
    ghost = only_a.copy()
    ghost[14:17, 14:17, 10:13] = 2
    assert score(catalog, {"both": case(both), "only_a": case(only_a, shown=ghost)}) == pytest.approx(0.75)
    # A dataset where no case has b and none is predicted scores on a alone.
    assert score(catalog, {"only_a": case(only_a)}) == pytest.approx(1.0)
