"""`hermes finetune`, `hermes extend`, `hermes priors` and generalisation through `hermes evaluate`,
from the command line, on the small synthetic cohort.

The base model is a real `hermes train` output (a few steps: the point is the plumbing, not
the accuracy): trained on AbdomenCT + KidneyCT; LiverCT is the new data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from hermes.cli import main

pytestmark = pytest.mark.slow

OLD = ["Dataset101_AbdomenCT", "Dataset103_KidneyCT"]
NEW = ["Dataset102_LiverCT"]
PATCH = [32, 32, 32]


def _catalog(path: Path, cohort: Path, folders: list[str], extra: dict | None = None) -> Path:
    datasets = [{"path": str(cohort / folder), **(extra or {})} for folder in folders]
    path.write_text(yaml.safe_dump({"datasets": datasets}))
    return path


@pytest.fixture(scope="module")
def adapt_env(small_cohort: Path, small_cache: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from hermes.config import load_train_config
    from hermes.training.trainer import train

    root = tmp_path_factory.mktemp("adaptation")
    _, cache = small_cache
    old_catalog = _catalog(root / "old.yaml", small_cohort, OLD)
    new_catalog = _catalog(root / "new.yaml", small_cohort, NEW)
    config_path = root / "train.yaml"
    config_path.write_text(yaml.safe_dump({
        "catalog": str(old_catalog), "cache": str(cache), "output": str(root / "run"), "steps": 3,
        "precision": "fp32", "checkpoint_every": 1000, "log_every": 1,
        "model": {"preset": "tiny"},
        "data": {"patch_size": PATCH, "batch_size": 1, "num_workers": 0, "val_fraction": 0.0, "val_min_cases": 0},
        "validation": {"every_steps": 1000},
    }))
    result = train(load_train_config(config_path), progress=False)
    return {"root": root, "cache": cache, "cohort": small_cohort, "old": old_catalog, "new": new_catalog,
            "base": Path(result.model_dir)}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "weights.safetensors"))


def test_finetune_cli_frozen_backbone_gives_a_predictable_merged_model(adapt_env: dict, tmp_path: Path) -> None:
    from hermes.adaptation.warm_start import context_parameter_names
    from hermes.inference.predictor import Predictor
    from hermes.models.registry import load_model

    out = tmp_path / "ft"
    code = main([
        "finetune", "-m", str(adapt_env["base"]), "--catalog", str(adapt_env["new"]), "--cache",
        str(adapt_env["cache"]), "-o", str(out), "--steps", "2", "--batch-size", "1", "--freeze", "backbone",
        "--task-from", "LiverCT/liver=AbdomenCT/liver", "--precision", "fp32", "--device", "cpu", "--quiet",
    ])
    assert code == 0
    spec = json.loads((out / "spec.json").read_text())
    names = [task["name"] for task in spec["catalog"]["tasks"]]
    base_spec = json.loads((adapt_env["base"] / "spec.json").read_text())
    assert names == [*base_spec["task_names"], "LiverCT/liver", "LiverCT/liver_tumour"]
    assert spec["adaptation"][-1]["kind"] == "finetune" and spec["adaptation"][-1]["freeze"] == "backbone"

    # Frozen backbone: every non-prior/fusion/head tensor is the base model's, bit for bit.
    model, _ = load_model(out)
    context = context_parameter_names(model)
    base_w, new_w = _weights(adapt_env["base"]), _weights(out)
    backbone = [k for k in new_w if k not in context]
    assert backbone and all(torch.equal(base_w[k], new_w[k]) for k in backbone)
    assert any(not torch.equal(base_w[k], new_w[k]) for k in context if base_w[k].shape == new_w[k].shape)

    # A normal model directory: `hermes predict` segments the new task (and the old ones).
    image = sorted((adapt_env["cohort"] / NEW[0] / "imagesTs").iterdir())[0]
    prediction = Predictor(out, device="cpu").predict(image, tasks=["LiverCT/liver_tumour", "AbdomenCT/liver"],
                                                       modality="CT", progress=False)
    assert prediction.shape == prediction.mask("LiverCT/liver_tumour").shape


def test_extend_gate_rejects_and_leaves_the_old_model_untouched(adapt_env: dict, tmp_path: Path) -> None:
    base = tmp_path / "model"
    shutil.copytree(adapt_env["base"], base)
    before = _digest(base)
    # A negative tolerance demands an improvement of 100 Dice points: the gate must fail.
    code = main([
        "extend", "-m", str(base), "--catalog", str(adapt_env["new"]), "--cache", str(adapt_env["cache"]),
        "--steps", "1", "--batch-size", "1", "--lr", "0.5", "--distill-weight", "0", "--tolerance", "-100",
        "--gate-max-cases", "1", "--gate-datasets", "KidneyCT", "--precision", "fp32", "--device", "cpu", "--quiet",
        "--report", str(tmp_path / "report.json"),
    ])
    assert code == 3
    assert _digest(base) == before  # not a byte changed
    rejected = tmp_path / "model.rejected"
    report = json.loads((rejected / "extend_report.json").read_text())
    assert report["accepted"] is False and report["gate"]["passed"] is False
    assert {row["task"] for row in report["gate"]["old_tasks"]} == {"KidneyCT/kidney", "KidneyCT/kidney_tumour"}
    assert json.loads((tmp_path / "report.json").read_text())["written_to"] == str(rejected)
    assert not any(p.name.startswith(".model.") for p in tmp_path.iterdir())  # no staging left behind


def test_extend_in_place_with_rehearsal_and_distillation(adapt_env: dict, tmp_path: Path) -> None:
    from hermes.adaptation.extend import run_extend
    from hermes.config import ExtendConfig

    base = tmp_path / "model"
    shutil.copytree(adapt_env["base"], base)
    calls: list[tuple[str, list[str]]] = []

    def stub(model_dir: Path, datasets: list[str], max_cases: int | None) -> dict:
        calls.append((Path(model_dir).name, list(datasets)))
        return {"AbdomenCT/liver": (50.0, 2), "LiverCT/liver": (40.0, 1)}

    config = ExtendConfig(
        base_model=base, catalog=adapt_env["new"], cache=adapt_env["cache"], old_cache=adapt_env["cache"],
        steps=1, precision="fp32", rehearsal_cases=1, rehearsal_batch=1, distill_weight=1.0,
        data={"patch_size": PATCH, "batch_size": 1, "num_workers": 0},
    )
    outcome = run_extend(config, device="cpu", evaluator=stub, progress=False)
    assert outcome.accepted and outcome.written_to == base
    assert calls[0] == ("model", ["AbdomenCT", "KidneyCT"])  # old tasks before, on the base model
    assert [c[1] for c in calls[1:]] == [["AbdomenCT", "KidneyCT"], ["LiverCT"]]
    spec = json.loads((base / "spec.json").read_text())
    record = spec["adaptation"][-1]
    assert record["kind"] == "extend" and set(record["rehearsal_buffer"]) == {"AbdomenCT", "KidneyCT"}
    assert record["final_loss"]["distill"] >= 0 and "LiverCT/liver" in spec["task_names"]
    assert json.loads((base / "extend_report.json").read_text())["gate"]["new_tasks"] == {"LiverCT/liver": 40.0}


def test_priors_cli_writes_labelled_heatmaps(adapt_env: dict, tmp_path: Path) -> None:
    from hermes.evaluation.similarity import SimilarityMatrix, heatmap_figure

    out = tmp_path / "priors"
    code = main(["priors", str(adapt_env["base"]), "--out", str(out), "--cache", str(adapt_env["cache"]),
                 "--cases", "1", "--order", "cluster"])
    assert code == 0
    spec = json.loads((adapt_env["base"] / "spec.json").read_text())
    for name in ("task_prior_enc2", "task_prior_all", "modality_prior_all", "task_prototype_static",
                 "task_prototype_posterior"):
        png = out / f"{name}.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (out / "task_prior_all.csv").read_text().splitlines()[0].split(",")[1:]
    assert header == spec["task_names"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["matrices"]["task_prior_all"]["nearest"]) == set(spec["task_names"])
    # The figure carries the task names as tick labels.
    import numpy as np

    figure = heatmap_figure(SimilarityMatrix("x", "t", tuple(spec["task_names"]), np.eye(len(spec["task_names"]))))
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == spec["task_names"]


def test_generalisation_evaluates_an_unseen_dataset_with_existing_tasks(adapt_env: dict, tmp_path: Path) -> None:
    # LiverCT was never trained on: its liver label is scored with the AbdomenCT liver task.
    catalog = _catalog(tmp_path / "unseen.yaml", adapt_env["cohort"], NEW,
                       {"labels": ["liver"], "tasks": {"liver": "AbdomenCT/liver"}})
    out = tmp_path / "eval"
    code = main(["evaluate", "-m", str(adapt_env["base"]), "--catalog", str(catalog), "--max-cases", "1",
                 "-o", str(out), "--device", "cpu", "--quiet", "--bootstrap", "0", "--workers", "1"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    task = summary["datasets"]["LiverCT"]["tasks"]["AbdomenCT/liver"]
    assert task["n_cases"] == 1 and task["dice"]["mean"] is not None
