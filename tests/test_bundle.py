"""hermes/bundle.py: the saved-model folder's one reader and writer, its schema and migration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inference_helpers import make_model_dir

from hermes.bundle import SCHEMA_VERSION, ModelBundle, is_model_folder, migrate_spec
from hermes.config import InferenceConfig, ModelConfig
from hermes.data.imageio import Image
from hermes.errors import ModelError
from hermes.inference import Predictor
from hermes.models.registry import build_model, load_model, save_model

FAST = InferenceConfig(overlap=0.25, window_batch_size=4, threshold=0.01, output="binary")
PATCH = [32, 32, 32]


def _network(**overrides: Any) -> dict[str, Any]:
    model = build_model(ModelConfig(preset="tiny"), 3, 2, patch_size=PATCH)
    return {**model.build_spec.model_dump(mode="json"), **overrides}


def version_1(folder: Path) -> dict[str, Any]:
    """The spec of ``folder`` as the code before the bundle wrote it: ``"version": 1``, the
    network under ``model``, a top-level copy of the patch, the training record as it was."""
    new = json.loads((folder / "spec.json").read_text())
    return {
        "format": "hermes-model",
        "version": 1,
        "paradigm": "universal",
        "dataset": None,
        "task_names": new["task_names"],
        "modalities": new["modalities"],
        "unknown_modality_id": len(new["modalities"]),
        "null_task_id": len(new["task_names"]),
        "datasets": new["datasets"],
        "preprocessing": new["preprocessing"],
        "patch_size": PATCH,
        "training": {
            "steps": 3,
            "seed": 0,
            "precision": "fp32",
            "validation_dice": {"CTSet": 0.5, "MRSet": None},
            "validation_cases": {"CTSet": ["ct_001"]},
            "config": {"seed": 0, "data": {"augment": {"enabled": True, "mirror_axes": [1, 2]}}},
            "final_weights": "ema",
            "validation_dice_by_weights": {"ema": {"CTSet": 0.5}},
        },
        "model": new["network"],
    }


def test_a_folder_written_before_the_bundle_loads_and_predicts_the_same(tmp_path: Path) -> None:
    current = make_model_dir(tmp_path / "current")
    old = make_model_dir(tmp_path / "old")
    (old / "spec.json").write_text(json.dumps(version_1(current)))
    a, b = Predictor(current, device="cpu", config=FAST), Predictor(old, device="cpu", config=FAST)
    assert b.bundle.schema_version == SCHEMA_VERSION and b.bundle.training.final_weights == "ema"
    assert (b.task_names, b.patch_size, b.own_tasks, b.context_prompts) == (
        a.task_names, a.patch_size, a.own_tasks, a.context_prompts
    )
    assert [p.to_dict() for p in b.plans] == [p.to_dict() for p in a.plans]
    assert b.trained_mirror_axes == (1, 2) and a.trained_mirror_axes == ()
    rng = np.random.default_rng(0)
    image = Image(rng.normal(40, 80, (30, 26, 18)).astype(np.float32), np.diag([1.5, 1.2, 2.5, 1.0]))
    pa = a.predict(image, modality="CT", progress=False)
    pb = b.predict(image, modality="CT", progress=False)
    assert pa.masks is not None and pb.masks is not None and pa.masks.keys() == pb.masks.keys()
    assert any(mask.any() for mask in pa.masks.values())
    for task, mask in pa.masks.items():
        np.testing.assert_array_equal(mask, pb.masks[task], err_msg=task)


def test_migration_of_version_1() -> None:
    """Schema 1 -> 2: the top-level patch is the fallback of the network's; flat plans become
    the datasets section; unknown keys stay errors."""
    spec = migrate_spec({"patch_size": [32, 32, 32], "model": _network(patch_size=[48, 48, 48])})
    assert "patch_size" not in spec and spec["network"]["patch_size"] == [48, 48, 48]
    assert ModelBundle.from_dict({"patch_size": [32, 32, 32], "model": _network(patch_size=None)}).patch_size == PATCH
    with pytest.raises(ModelError, match="no patch_size"):
        _ = ModelBundle.from_dict({"model": _network(patch_size=None)}, "m/spec.json").patch_size
    adapted = ModelBundle.from_dict({
        "model": _network(),
        "catalog": {"tasks": [{"name": "A/x", "index": 0}], "modalities": ["CT"]},
        "preprocessing": {"A": {"dataset": "A"}, "B": {"dataset": "B"}},
        "adaptation": [{"kind": "finetune", "freeze": "backbone", "train_cases": {"A": ["a1"]}}],
    })
    assert adapted.preprocessing is not None and list(adapted.preprocessing.datasets) == ["A", "B"]
    assert adapted.preprocessing.modalities == {} and adapted.adaptation[0].kind == "finetune"
    assert adapted.summary()["task_names"] == ["A/x"]
    with pytest.raises(ModelError, match="unknown_key"):
        ModelBundle.from_dict({"model": _network(), "unknown_key": 1})
    with pytest.raises(ModelError, match="version 7"):
        ModelBundle.from_dict({"version": 7, "model": _network()})


def test_the_bundle_rejects_what_it_does_not_know(tmp_path: Path) -> None:
    ModelBundle(network=_network()).write_spec(tmp_path)
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["schema_version"] == SCHEMA_VERSION and "model" not in spec and "patch_size" not in spec
    for edit, problem in (
        ({"extra": 1}, r"spec\.json: not a valid model spec: extra: Extra inputs"),
        ({"training": {"steps": 1, "stpes": 2}}, r"training\.stpes"),
        ({"network": {**spec["network"], "patch_size": [32, 32]}}, r"network\.patch_size"),
        ({"schema_version": SCHEMA_VERSION + 1}, "a newer Hermes"),
        ({"format": "hermes-onnx"}, "format"),
    ):
        (tmp_path / "spec.json").write_text(json.dumps({**spec, **edit}))
        with pytest.raises(ModelError, match=problem):
            ModelBundle.load(tmp_path)
    (tmp_path / "spec.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        ModelBundle.load(tmp_path)
    assert not is_model_folder(tmp_path / "nothing")


def test_save_round_trip_and_the_network_entry_is_the_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), 3, 2, patch_size=PATCH)
    bundle = ModelBundle(task_names=["a", "b", "c"], network=model.build_spec)
    save_model(tmp_path / "m", model, bundle, catalog_yaml="datasets: []\n")
    _, again = load_model(tmp_path / "m")
    assert again.to_dict() == bundle.to_dict() and (tmp_path / "m" / "catalog.yaml").read_text() == "datasets: []\n"
    other = build_model(ModelConfig(preset="tiny"), 4, 2, patch_size=PATCH)
    with pytest.raises(ModelError, match="not this model's"):
        save_model(tmp_path / "x", other, bundle)
    assert not is_model_folder(tmp_path / "x")
