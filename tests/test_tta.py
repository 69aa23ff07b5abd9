"""Mirroring TTA (hermes/inference/tta.py): left stays left, unsafe mirrors are refused.

The network is a deterministic fake that, like a real model trained without mirroring, tells
left from right by position: the "left" task fires on bright voxels in the window's upper x
half, the "right" task in the lower half, the "midline" task on both.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from inference_helpers import make_model_dir

from hermes.bundle import AdaptationRecord, TrainingRecord
from hermes.config import InferenceConfig
from hermes.data.catalog import load_catalog
from hermes.data.imageio import Image
from hermes.errors import ConfigError
from hermes.inference import Predictor
from hermes.inference import predictor as predictor_module
from hermes.inference.tta import MirrorPlan, plan_mirroring, trained_mirror_axes

FAST = InferenceConfig(overlap=0.25, window_batch_size=4)
TTA = InferenceConfig(overlap=0.25, window_batch_size=4, mirror_tta=True)
DATASETS = (("BodyCT", "CT", ("kidney_left", "kidney_right", "spine"), None),)


class SidedFake(torch.nn.Module):
    """Logit +4 where the task's structure is, -10 elsewhere; sides by window position."""

    modality_head = None

    def __init__(self, roles: dict[int, str]) -> None:
        super().__init__()
        self.roles = roles

    def forward(self, image, task_ids, modality_id, task_mask=None, output_tasks=None):  # type: ignore[no-untyped-def]
        bright = image[:, 0] > 1.0
        upper = (torch.arange(image.shape[2]) >= image.shape[2] // 2).view(1, -1, 1, 1)
        masks = {"left": bright & upper, "right": bright & ~upper, "midline": bright}
        channels = [masks[self.roles[int(t)]] for t in task_ids[0]]
        logits = torch.where(torch.stack(channels, dim=1), 4.0, -10.0)
        if output_tasks is not None:
            logits = logits[:, list(output_tasks)]
        return SimpleNamespace(logits=logits, modality_logits=None, deep_supervision=[])


def _model(tmp_path: Path, pairs: list[list[int]] | None, mirror_axes: list[int] | None = None) -> Path:
    directory = make_model_dir(tmp_path / "model", datasets=DATASETS)
    spec_path = directory / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["datasets"][0]["mirror_pairs"] = pairs
    if mirror_axes is not None:
        spec["training"]["config"] = {"data": {"augment": {"enabled": True, "mirror_axes": mirror_axes}}}
    spec_path.write_text(json.dumps(spec))
    return directory


def _predictor(directory: Path, config: InferenceConfig) -> Predictor:
    predictor = Predictor(directory, device="cpu", config=config)
    predictor.model = SidedFake({0: "left", 1: "right", 2: "midline"})
    predictor.channels_last = False
    return predictor


def _image() -> Image:
    """24^3 soft tissue at the plan's spacing with one bright blob on each side (x)."""
    array = np.zeros((24, 24, 24), np.float32)
    array[3:8, 6:14, 5:12] = 1000.0
    array[16:21, 9:17, 10:18] = 1000.0
    return Image(array, np.diag([2.0, 2.0, 2.0, 1.0]))


def _masks(predictor: Predictor) -> dict[str, np.ndarray]:
    prediction = predictor.predict(_image(), modality="CT", output="binary", progress=False)
    assert prediction.masks is not None
    return {name.rsplit("/", 1)[-1]: mask for name, mask in prediction.masks.items()}


def test_left_right_pairs_keep_masks_on_their_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _model(tmp_path, pairs=[[0, 1]])
    plain = _masks(_predictor(directory, FAST))
    assert plain["kidney_left"].any() and plain["kidney_right"].any()
    assert not (plain["kidney_left"] & plain["kidney_right"]).any()
    assert plain["kidney_left"][16:21, 9:17, 10:18].all() and not plain["kidney_left"][:12].any()  # one side

    tta = _predictor(directory, TTA)
    for group in tta.prompt_groups(tta.default_tasks("CT"), "CT"):
        assert tta._group_network(group, 0) is not None
    assert plan_mirroring(tta.trained_mirror_axes, tta.catalog.datasets) == MirrorPlan((), 0, ((0, 1),))
    mirrored = _masks(tta)
    for task in plain:  # left stays left, right stays right, the midline task is unchanged
        np.testing.assert_array_equal(mirrored[task], plain[task], err_msg=task)

    # The old rule (mirror every axis, nothing swapped) averages each kidney with its opposite:
    monkeypatch.setattr(predictor_module, "plan_mirroring", lambda axes, entries: MirrorPlan((0, 1, 2)))
    old = _masks(_predictor(directory, TTA))
    assert not old["kidney_left"].any() and not old["kidney_right"].any()
    np.testing.assert_array_equal(old["spine"], plain["spine"])


def test_a_partner_outside_the_request_is_computed(tmp_path: Path) -> None:
    """Asking for the left kidney only still reads the right kidney's channel in mirrored passes."""
    tta = _predictor(_model(tmp_path, pairs=[[0, 1]]), TTA)
    prediction = tta.predict(_image(), tasks=["kidney_left"], modality="CT", output="binary", progress=False)
    plain = _predictor(tmp_path / "model", FAST).predict(
        _image(), tasks=["kidney_left"], modality="CT", output="binary", progress=False
    )
    assert prediction.masks is not None and plain.masks is not None
    assert list(prediction.masks) == ["BodyCT/kidney_left"]
    np.testing.assert_array_equal(prediction.masks["BodyCT/kidney_left"], plain.masks["BodyCT/kidney_left"])
    assert prediction.masks["BodyCT/kidney_left"].any()


def test_tta_refused_without_trained_mirrors_or_pairs(tmp_path: Path) -> None:
    directory = _model(tmp_path, pairs=None)
    with pytest.raises(ConfigError, match=r"--tta refused: the model was trained without mirroring.*BodyCT.*mirror_pairs"):
        Predictor(directory, device="cpu", config=TTA)
    Predictor(directory, device="cpu", config=FAST)  # without --tta the model is fine


def test_trained_axes_are_mirrored_as_trained(tmp_path: Path) -> None:
    directory = _model(tmp_path, pairs=None, mirror_axes=[1, 2])
    tta = _predictor(directory, TTA)
    assert tta.trained_mirror_axes == (1, 2)
    assert plan_mirroring(tta.trained_mirror_axes, tta.catalog.datasets) == MirrorPlan((1, 2))
    plain = _masks(_predictor(directory, FAST))
    mirrored = _masks(tta)  # the fake is symmetric in y and z, so these mirrors change nothing
    for task in plain:
        np.testing.assert_array_equal(mirrored[task], plain[task], err_msg=task)


def test_trained_mirror_axes_of_every_training_stage() -> None:
    def augment(axes: list[int], enabled: bool = True) -> dict:
        return {"data": {"augment": {"enabled": enabled, "mirror_axes": axes}}}

    assert trained_mirror_axes(None) == ()
    assert trained_mirror_axes(TrainingRecord(config=augment([0, 1, 2]))) == (0, 1, 2)
    assert trained_mirror_axes(TrainingRecord(config=augment([0, 1], enabled=False))) == ()
    base = TrainingRecord(config=augment([1, 2]))
    assert trained_mirror_axes(base, [AdaptationRecord(config={"data": None})]) == (1, 2)
    assert trained_mirror_axes(base, [AdaptationRecord(config=augment([2]))]) == (2,)


def test_catalog_mirror_pairs(small_cohort: Path, tmp_path: Path) -> None:
    import yaml

    folder = next(p for p in small_cohort.iterdir() if p.name.endswith("_AbdomenCT"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"datasets": [{"path": str(folder), "mirror_pairs": [["kidney_left", "kidney_right"]]}]}))
    catalog = load_catalog(path)
    entry = catalog.dataset("AbdomenCT")
    names = [catalog.tasks[t].name for pair in entry.mirror_pairs or () for t in pair]
    assert names == ["AbdomenCT/kidney_left", "AbdomenCT/kidney_right"]
    assert type(catalog).from_dict(json.loads(json.dumps(catalog.to_dict()))).datasets[0].mirror_pairs == entry.mirror_pairs
    assert load_catalog(path).to_yaml() == catalog.to_yaml()
    path.write_text(yaml.safe_dump({"datasets": [{"path": str(folder), "mirror_pairs": [["kidney_left", "pancreas"]]}]}))
    with pytest.raises(ConfigError, match=r"mirror_pairs\[0\]: 'pancreas' is not a task of dataset 'AbdomenCT'"):
        load_catalog(path)
