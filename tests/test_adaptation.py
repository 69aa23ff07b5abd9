"""Fast unit tests of hermes.adaptation: warm start, freezing, batch mixing, distillation
prompts, the forgetting gate's arithmetic. Pipeline tests (CLI on a synthetic cohort) are in
test_adaptation_cli.py."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from hermes.adaptation import engine
from hermes.adaptation.extend import Distiller, task_dice
from hermes.adaptation.gate import compare, format_table
from hermes.adaptation.warm_start import (
    context_parameter_names,
    freeze_backbone,
    plan_warm_start,
    warm_start_state,
)
from hermes.config import FinetuneConfig, ModelConfig, WarmStartConfig
from hermes.data.catalog import Catalog, DatasetEntry, TaskSpec
from hermes.data.modalities import ModalityVocabulary
from hermes.errors import ConfigError, ModelError
from hermes.models.registry import build_model

OLD_TASKS = ["A/liver", "A/spleen", "B/liver"]
NEW_TASKS = [*OLD_TASKS, "C/liver", "C/tumour"]
OLD_MODALITIES = ["CT", "PET", "T1", "T2", "FLAIR", "LGE", "cine"]
NEW_MODALITIES = [*OLD_MODALITIES, "SPECT"]


def _tiny(num_tasks: int, num_modalities: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(preset="tiny"), num_tasks, num_modalities)


def _pools(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return dict(model.priors.pools.items())  # type: ignore[union-attr]


def test_warm_start_keeps_old_tokens_bit_exact_and_adds_rows() -> None:
    old = _tiny(len(OLD_TASKS), len(OLD_MODALITIES), seed=1)
    new = _tiny(len(NEW_TASKS), len(NEW_MODALITIES), seed=2)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    plan = plan_warm_start(
        OLD_TASKS, NEW_TASKS, OLD_MODALITIES, NEW_MODALITIES,
        WarmStartConfig(task_init="mean", task_from={"C/liver": "A/liver"}, modality_init="random"),
    )
    state, reinit = warm_start_state(old.state_dict(), new.state_dict(), plan)
    new.load_state_dict(state)
    assert reinit == []
    t_old, t_new, m_old, m_new = len(OLD_TASKS), len(NEW_TASKS), len(OLD_MODALITIES), len(NEW_MODALITIES)
    for stage, pool in _pools(new).items():
        old_pool = _pools(old)[stage]
        tokens, old_tokens = pool.task_tokens.detach(), old_pool.task_tokens.detach()
        assert tokens.shape == (t_new + 1, old_tokens.shape[1])
        assert torch.equal(tokens[:t_old], old_tokens[:t_old])  # bit-exact old rows, same ids
        assert torch.equal(tokens[t_new], old_tokens[t_old])  # NULL moved to the new last row
        assert torch.equal(tokens[3], old_tokens[0])  # copy of A/liver
        # mean init: the mean of the old real rows plus a small jitter, distinct per new task
        assert torch.allclose(tokens[4], old_tokens[:t_old].mean(0), atol=0.2 * tokens[4].abs().max().item() + 0.05)
        assert not torch.equal(tokens[4], tokens[3])
        modality, old_modality = pool.modality_tokens.detach(), old_pool.modality_tokens.detach()
        assert modality.shape[0] == m_new + 1
        assert torch.equal(modality[:m_old], old_modality[:m_old])
        assert torch.equal(modality[m_new], old_modality[m_old])  # UNKNOWN moved
        key = f"priors.pools.{stage}.modality_tokens"
        assert torch.equal(modality[m_old], fresh[key][m_old])  # "random": the fresh row
    # Every other weight is the old one; the modality classifier keeps its old classes.
    old_state = old.state_dict()
    for key, value in new.state_dict().items():
        if "pools" in key:
            continue
        if "logit_calibration" in key:  # one row per task id + null, grown like a task pool
            assert value.shape[0] == t_new + 1
            assert torch.equal(value[:t_old], old_state[key][:t_old]) and torch.equal(value[t_new], old_state[key][t_old])
            continue
        if value.shape == old_state[key].shape:
            assert torch.equal(value, old_state[key]), key
        else:
            assert value.shape[0] == m_new and torch.equal(value[:m_old], old_state[key]), key


def test_warm_start_plan_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="task_from has no entry"):
        plan_warm_start(OLD_TASKS, NEW_TASKS, OLD_MODALITIES, OLD_MODALITIES, WarmStartConfig(task_init="copy"))
    with pytest.raises(ConfigError, match="not a task of the base model"):
        plan_warm_start(
            OLD_TASKS, NEW_TASKS, OLD_MODALITIES, OLD_MODALITIES, WarmStartConfig(task_from={"C/liver": "Z/kidney"})
        )
    with pytest.raises(ConfigError, match="ambiguous"):  # "liver" is A/liver or B/liver
        plan_warm_start(
            OLD_TASKS, NEW_TASKS, OLD_MODALITIES, OLD_MODALITIES, WarmStartConfig(task_from={"C/liver": "liver"})
        )
    with pytest.raises(ConfigError, match="not new tasks"):
        plan_warm_start(
            OLD_TASKS, NEW_TASKS, OLD_MODALITIES, OLD_MODALITIES, WarmStartConfig(task_from={"A/liver": "B/liver"})
        )
    plan = plan_warm_start(
        OLD_TASKS, NEW_TASKS, OLD_MODALITIES, OLD_MODALITIES, WarmStartConfig(task_from={"C/liver": "spleen"})
    )
    assert plan.task_rows[3].source == 1  # unambiguous short name


def test_warm_start_rejects_another_architecture() -> None:
    old = _tiny(3, 7, seed=0)
    torch.manual_seed(0)
    other = build_model(ModelConfig(preset="tiny", widths=[8, 16, 32, 64, 96]), 3, 7)
    plan = plan_warm_start(OLD_TASKS, OLD_TASKS, OLD_MODALITIES, OLD_MODALITIES, WarmStartConfig())
    with pytest.raises(ModelError, match="shape"):
        warm_start_state(old.state_dict(), other.state_dict(), plan)


PATCH = (32, 16, 16)  # the smallest patch whose 1/16 bottleneck still has >1 voxel (instance norm)


def _random_batches(num_tasks: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        target = (torch.rand((2, 2, *PATCH), generator=generator) > 0.7).float()
        yield {
            "image": torch.randn((2, 1, *PATCH), generator=generator),
            "target": target,
            "task_ids": torch.tensor([[0, 1], [2, num_tasks]]),
            "task_mask": torch.tensor([[True, True], [True, False]]),
            "modality_id": torch.tensor([0, 2]),
            "dataset_id": torch.tensor([0, 1]),
            "case_id": ["a", "b"],
        }


def _config(tmp_path: Any, **kw: Any) -> FinetuneConfig:
    return FinetuneConfig(
        base_model=tmp_path, catalog=tmp_path / "c.yaml", cache=tmp_path, output=tmp_path / "out",
        precision="fp32", log_every=1, **kw,
    )


def test_frozen_backbone_stays_unchanged_while_priors_train(tmp_path: Any) -> None:
    model = _tiny(3, 7, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = freeze_backbone(model)
    context = context_parameter_names(model)
    assert frozen and context and not set(frozen) & context
    assert any(name.startswith("backbone.stem") for name in frozen)
    assert any(".fusion." in name for name in context)  # fusion blocks live in the backbone module
    config = _config(tmp_path, steps=3, freeze="backbone")
    result = engine.train(model, _random_batches(3), config, torch.device("cpu"), frozen=frozen, progress=False)
    assert len(result.history) == 3 and all(row["loss"] > 0 for row in result.history)
    for trained in (model, result.model):  # the live weights and the saved (EMA) weights
        state = trained.state_dict()
        for name in frozen:
            assert torch.equal(state[name], before[name]), name
        assert any(not torch.equal(state[name], before[name]) for name in context)


def test_freeze_needs_context_modules() -> None:
    torch.manual_seed(0)
    baseline = build_model(ModelConfig(architecture="resunet", preset="tiny"), 3, 7, task_ids_of_model=[0, 1])
    with pytest.raises(ConfigError, match="Hermes model"):
        freeze_backbone(baseline)


def test_concat_batches_pads_task_slots() -> None:
    a = next(_random_batches(3))
    b = {**a, "task_ids": torch.tensor([[1], [0]]), "task_mask": torch.tensor([[True], [True]]),
         "target": a["target"][:, :1]}
    b = {k: v[:1] for k, v in b.items()}
    mixed = engine.concat_batches(b, a, null_task_id=3)
    assert mixed["image"].shape[0] == 3 and mixed["task_ids"].shape == (3, 2)
    assert mixed["task_ids"][0].tolist() == [1, 3] and mixed["task_mask"][0].tolist() == [True, False]
    assert mixed["target"].shape[1] == 2 and float(mixed["target"][0, 1].abs().sum()) == 0.0
    assert mixed["case_id"] == ["a", "a", "b"]


def _catalog(datasets: list[tuple[str, str, int, list[int]]], tasks: list[str], vocab: list[str]) -> Catalog:
    vocabulary = ModalityVocabulary.from_names(vocab)
    entries = [
        DatasetEntry(
            name=name, path=__import__("pathlib").Path("/nonexistent") / name, folder=name, modality=modality,
            modality_id=modality_id, family="ct", channel_names=("CT",), labels={"background": 0},
            task_ids=task_ids, label_values=[(i + 1,) for i in range(len(task_ids))],
            local_names=[tasks[t].split("/")[-1] for t in task_ids], num_train=2, num_test=1,
        )
        for name, modality, modality_id, task_ids in datasets
    ]
    return Catalog([TaskSpec(n, i) for i, n in enumerate(tasks)], vocabulary, entries)


def test_merge_keeps_old_ids_and_appends_new_tasks_and_modalities() -> None:
    from hermes.adaptation.merge import merge_catalogs

    old = _catalog([("A", "CT", 0, [0, 1]), ("M", "unknown", 2, [2])], ["A/liver", "A/spleen", "M/liver"], ["CT", "T1"])
    new = _catalog([("C", "SPECT", 0, [0, 1])], ["C/liver", "A/spleen"], ["SPECT"])
    merged = merge_catalogs(old, new)
    cat = merged.catalog
    assert cat.task_names == ["A/liver", "A/spleen", "M/liver", "C/liver"]
    assert merged.added_tasks == [3] and merged.task_map == {0: 3, 1: 1}  # A/spleen: same name, same token
    assert cat.modalities == ["CT", "T1", "SPECT"] and merged.added_modalities == [2]
    assert cat.dataset("M").modality_id == 3  # unknown moved from 2 to 3
    assert cat.dataset("C").task_ids == [3, 1] and cat.dataset("C").modality_id == 2
    with pytest.raises(ConfigError, match="already part of the model"):
        merge_catalogs(old, old)


def test_distiller_prompts_old_tasks_of_the_same_modality_only() -> None:
    old = _catalog(
        [("A", "CT", 0, [0, 1]), ("B", "CT", 0, [2]), ("R", "T1", 2, [3])],
        ["A/liver", "A/spleen", "B/liver", "R/brain"], ["CT", "PET", "T1"],
    )
    teacher = _tiny(4, 3, seed=0)
    distiller = Distiller(teacher, old, merged_unknown=4, new_null=6, weight=1.0, kind="mse", seed=0)
    prompts, keep = distiller.prompts([0, 3, 2, 4], step=0)  # CT, new modality, T1, unknown
    assert keep == [0, 2]
    assert prompts[0] in ([0, 1], [2]) and prompts[1] == [3]
    seen = {tuple(distiller.prompts([0], step)[0][0]) for step in range(20)}
    assert seen == {(0, 1), (2,)}  # both CT datasets get drawn


def test_distillation_is_zero_for_the_teacher_itself() -> None:
    old = _catalog([("A", "CT", 0, [0, 1]), ("B", "CT", 0, [2])], ["A/liver", "A/spleen", "B/liver"], OLD_MODALITIES)
    teacher = _tiny(3, 7, seed=0).eval()
    student = _tiny(3, 7, seed=0).eval()
    batch = next(_random_batches(3))
    batch["modality_id"] = torch.tensor([0, 0])
    for kind in ("mse", "bce"):
        distiller = Distiller(teacher, old, merged_unknown=7, new_null=3, weight=1.0, kind=kind, seed=0)
        value = float(distiller(student, batch, 0)["distill"].detach())
        if kind == "mse":
            assert value == pytest.approx(0.0, abs=1e-10)
        else:  # BCE against itself is the entropy of the teacher's probabilities, > 0
            assert value > 0
    other = _tiny(3, 7, seed=5).eval()
    distiller = Distiller(teacher, old, merged_unknown=7, new_null=3, weight=2.0, kind="mse", seed=0)
    assert float(distiller(other, batch, 0)["distill"].detach()) > 0


def test_gate_flags_drops_beyond_the_tolerance() -> None:
    before = {"A/liver": (90.0, 4), "A/spleen": (80.0, 4), "B/liver": (None, 0)}
    after = {"A/liver": (88.5, 4), "A/spleen": (70.0, 4), "B/liver": (50.0, 4)}
    result = compare(before, after, tolerance=2.0, new_tasks={"C/liver": 75.0})
    assert not result.passed and [c.task for c in result.violations] == ["A/spleen"]
    table = format_table(result)
    assert "A/spleen" in table and "FAILED" in table and "C/liver" in table
    assert compare(before, after, tolerance=10.0).passed
    assert result.to_dict()["violations"] == ["A/spleen"]


def test_task_dice_averages_shared_tasks_over_datasets() -> None:
    summary = {"datasets": {
        "A": {"tasks": {"liver": {"dice": {"mean": 0.9, "n": 3}, "n_cases": 3}}},
        "B": {"tasks": {"liver": {"dice": {"mean": 0.5, "n": 1}, "n_cases": 2},
                        "tumour": {"dice": {"mean": None, "n": 0}, "n_cases": 2}}},
    }}
    scores = task_dice(summary)
    assert scores["liver"][0] == pytest.approx(80.0) and scores["liver"][1] == 5
    assert scores["tumour"] == (None, 2)


def test_adaptation_stops_with_a_clear_error_when_the_loss_diverges(tmp_path: Any) -> None:
    """The shared optimisation step skips a non-finite update; adaptation then stops, naming the step,
    and the weights are not poisoned by the NaN."""
    model = _tiny(3, 7, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_after_first(model: torch.nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        return {"distill": torch.tensor(float("nan") if step == 1 else 0.0)}

    config = _config(tmp_path, steps=3)
    with pytest.raises(ModelError, match="diverged at step 1"):
        engine.train(model, _random_batches(3), config, torch.device("cpu"), extra_loss=nan_after_first, progress=False)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())  # step 0 trained
