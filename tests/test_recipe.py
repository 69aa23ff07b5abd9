"""The universal training recipe's options (issue: make the universal model win). Each test
fails when its option is switched off or broken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hermes.config import AugmentConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from hermes.data.cache import open_cache, prepare_cache
from hermes.data.catalog import load_catalog
from hermes.data.sampling import PatchSampler, training_cases
from hermes.models.heads import TaskLogitCalibration
from hermes.models.layers import PreActConv
from hermes.models.registry import build_model, load_model, save_model
from hermes.training.ema import ModelEMA
from hermes.training.loss import partial_label_terms
from hermes.training.optim import build_optimizer, is_decay_exempt


# --------------------------------------------------------------------------------------------
# Loss reduction
# --------------------------------------------------------------------------------------------
def _two_datasets_batch(bce_a: float, bce_b: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample 0 has 7 tasks, sample 1 has 2 (+5 padded slots); every pair of a sample has the
    same BCE (constant logits against an all-background target)."""
    def logit_for(bce: float) -> float:  # BCE(x, 0) = softplus(x)
        return float(np.log(np.expm1(bce)))

    logits = torch.empty(2, 7, 4, 4, 4)
    logits[0] = logit_for(bce_a)
    logits[1] = logit_for(bce_b)
    target = torch.zeros_like(logits)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :] = True
    mask[1, :2] = True
    return logits, target, mask


def test_per_sample_reduction_gives_every_sample_the_same_share() -> None:
    logits, target, mask = _two_datasets_batch(0.2, 1.0)
    bce_sample, _ = partial_label_terms(logits, target, mask, reduction="sample")
    bce_pair, _ = partial_label_terms(logits, target, mask, reduction="pair")
    assert bce_sample.item() == pytest.approx((0.2 + 1.0) / 2, rel=1e-5)
    assert bce_pair.item() == pytest.approx((7 * 0.2 + 2 * 1.0) / 9, rel=1e-5)


def test_per_sample_reduction_equalises_gradient_shares_per_dataset() -> None:
    """The gradient mass reaching each sample's logits is equal under "sample" and follows the
    task count (7:2) under "pair"."""
    logits, target, mask = _two_datasets_batch(0.5, 0.5)
    shares = {}
    for reduction in ("sample", "pair"):
        x = logits.clone().requires_grad_(True)
        bce, _ = partial_label_terms(x, target, mask, reduction=reduction)
        bce.backward()
        per_sample = x.grad.abs().flatten(1).sum(1)
        shares[reduction] = (per_sample / per_sample.sum()).tolist()
    assert shares["sample"] == pytest.approx([0.5, 0.5], abs=1e-6)
    assert shares["pair"] == pytest.approx([7 / 9, 2 / 9], abs=1e-6)


def test_sample_without_contributing_tasks_is_not_counted() -> None:
    logits, target, mask = _two_datasets_batch(0.3, 0.9)
    mask[1] = False
    bce, dice = partial_label_terms(logits, target, mask, reduction="sample")
    assert bce.item() == pytest.approx(0.3, rel=1e-5)
    assert dice.item() == 0.0  # no non-empty target anywhere


# --------------------------------------------------------------------------------------------
# Task-balanced sampling
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def abdomen_and_kidney(small_cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    import yaml

    root = tmp_path_factory.mktemp("recipe_sampling")
    folders = [small_cohort / n for n in ("Dataset101_AbdomenCT", "Dataset103_KidneyCT")]
    (root / "catalog.yaml").write_text(yaml.safe_dump({"datasets": [{"path": str(p)} for p in folders]}))
    catalog = load_catalog(root / "catalog.yaml")
    prepare_cache(catalog, root / "cache", workers=1, progress=False)
    return catalog, root / "cache"


def _tumour_rate(catalog, cache: Path, task_balance: float, n: int = 240) -> float:
    cfg = DataConfig(
        patch_size=[16, 16, 16], batch_size=1, num_workers=0, foreground_fraction=0.5,
        task_balance=task_balance, augment=AugmentConfig(enabled=False),
    )
    train, _ = training_cases(open_cache(cache), cfg, seed=0)
    sampler = PatchSampler(catalog, str(cache), cfg, train, seed=0)
    tumour = catalog.task_names.index("KidneyCT/kidney_tumour")
    hits = 0
    for i in range(n):
        batch = sampler.batch(i)
        ids = batch["task_ids"][0].tolist()
        if tumour in ids and batch["target"][0, ids.index(tumour)].sum() > 0:
            hits += 1
    return hits / n


def test_task_balanced_sampling_gives_a_rare_task_its_share(abdomen_and_kidney) -> None:
    """7 tasks (AbdomenCT 5 + KidneyCT 2): task-first sampling centres 1/7 of the patches on
    the kidney tumour (plus the few that contain it by chance). Dataset-first sampling gives it
    what KidneyCT's share of the datasets gives it (here 0.30: two datasets, one with the
    tumour), so the option is visible in both directions."""
    catalog, cache = abdomen_and_kidney
    n_tasks = sum(len(e.task_ids) for e in catalog.datasets)
    balanced = _tumour_rate(catalog, cache, 1.0)
    dataset_first = _tumour_rate(catalog, cache, 0.0)
    n = 240
    tolerance = 3 * np.sqrt((1 / n_tasks) * (1 - 1 / n_tasks) / n)
    assert balanced >= 1 / n_tasks - tolerance
    assert balanced <= 1 / n_tasks + tolerance + 0.05  # other patches may contain the tumour too
    assert abs(dataset_first - balanced) > 0.05


def test_task_pool_lists_only_cases_that_contain_the_task(abdomen_and_kidney) -> None:
    catalog, cache = abdomen_and_kidney
    cfg = DataConfig(patch_size=[16, 16, 16], num_workers=0, task_balance=1.0)
    train, _ = training_cases(open_cache(cache), cfg, seed=0)
    sampler = PatchSampler(catalog, str(cache), cfg, train, seed=0)
    for dataset, channel, ids in sampler.task_pool():
        values = catalog.dataset(dataset).label_values[channel]
        for case_id in ids:
            present = sampler.case(dataset, case_id).meta["labels_present"]
            assert any(str(v) in present for v in values)


def test_task_balance_out_of_range_is_an_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="task_balance"):
        DataConfig(task_balance=1.5)


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(8)


def _bias_after_steps(param_groups: str, steps: int = 30) -> float:
    torch.manual_seed(0)
    model = _Tiny()
    optimizer = build_optimizer(model, OptimConfig(name="lamb", lr=1e-2, weight_decay=1e-5, param_groups=param_groups))
    for _ in range(steps):
        optimizer.zero_grad()
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    return model.linear.bias.abs().max().item()


def test_split_groups_let_zero_initialised_biases_move_under_lamb() -> None:
    # "split": a plain Adam step of lr per step; "single": the trust ratio ||w||/||u|| pins it.
    assert _bias_after_steps("split") == pytest.approx(30 * 1e-2, rel=0.05)
    assert _bias_after_steps("single") < 0.05


def test_split_groups_exempt_biases_norms_priors_and_calibration() -> None:
    model = build_model(ModelConfig(), num_tasks=3, num_modalities=2)
    optimizer = build_optimizer(model, OptimConfig(param_groups="split"))
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] > 0 and exempt["weight_decay"] == 0.0
    exempt_ids = {id(p) for p in exempt["params"]}
    for name, p in model.named_parameters():
        expected = p.ndim <= 1 or name.startswith("priors.")
        assert (id(p) in exempt_ids) == expected == is_decay_exempt(name, p), name
    assert any(name.startswith("priors.") for name, p in model.named_parameters() if id(p) in exempt_ids)
    assert len(build_optimizer(model, OptimConfig(param_groups="single")).param_groups) == 1


# --------------------------------------------------------------------------------------------
# Prototype logit calibration
# --------------------------------------------------------------------------------------------
def test_affine_logits_apply_each_tasks_scale_and_bias() -> None:
    calibration = TaskLogitCalibration(num_tasks=3)
    with torch.no_grad():
        calibration.log_scale.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])))
        calibration.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    logits = torch.ones(1, 2, 2, 2, 2)
    out = calibration(logits, torch.tensor([[2, 0]]))
    assert torch.allclose(out[0, 0], torch.full((2, 2, 2), 3.0 + 0.3))
    assert torch.allclose(out[0, 1], torch.full((2, 2, 2), 1.0 + 0.1))


def test_affine_is_the_default_and_dot_has_no_calibration() -> None:
    affine = build_model(ModelConfig(), num_tasks=3, num_modalities=2)
    dot = build_model(ModelConfig(prototype_logit="dot"), num_tasks=3, num_modalities=2)
    assert affine.logit_calibration is not None and dot.logit_calibration is None
    image = torch.randn(1, 1, 32, 32, 32)
    ids, modality = torch.tensor([[0, 1]]), torch.tensor([0])
    with torch.no_grad():
        affine.logit_calibration.bias[1] = 5.0
        out = affine(image, ids, modality).logits
        affine.logit_calibration.bias[1] = 0.0
        plain = affine(image, ids, modality).logits
    assert torch.allclose(out[0, 1], plain[0, 1] + 5.0, atol=1e-4)
    assert torch.equal(out[0, 0], plain[0, 0])


@pytest.mark.parametrize("feature_head", ["linear", "mlp"])
def test_mlp_feature_head_gives_tasks_more_directions_than_the_decoder_width(feature_head) -> None:
    """With the bare decoder features every task's logit map is a linear function of the same
    8 channels (tiny preset), so 12 tasks' logits span at most 8 dimensions; the MLP head's
    32-D non-linear features do not have that ceiling."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_head=feature_head, prototype_logit="dot"), num_tasks=12, num_modalities=1)
    width = ModelConfig().widths or [8]
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        logits = model.eval()(image, torch.arange(12)[None], torch.tensor([0])).logits
    rank = int(torch.linalg.matrix_rank(logits[0].flatten(1).double(), rtol=1e-6))
    if feature_head == "linear":
        assert rank <= width[0] == 8
    else:
        assert rank == 12


@pytest.mark.parametrize("channels_last", [True, False])
def test_mlp_head_folded_norm_equals_the_layer_stack(channels_last) -> None:
    """FeatureMlp computes conv -> instance norm -> LeakyReLU -> conv as per-sample GEMMs (the
    norm folded into the first layer): same values and gradients as running its layers."""
    from hermes.models.heads import FeatureMlp

    torch.manual_seed(0)
    head = FeatureMlp(8, 32, "instance")
    features = 3.0 * torch.randn(2, 8, 12, 10, 9) + 1.5
    if channels_last:
        features = features.to(memory_format=torch.channels_last_3d)
    outputs, grads = [], []
    for run in (head.forward, head.layers):
        x = features.clone().requires_grad_(True)
        head.zero_grad()
        out = run(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append((x.grad, head.layers[0].weight.grad.clone(), head.layers[3].weight.grad.clone()))
    assert outputs[0].shape == outputs[1].shape == (2, 32, 12, 10, 9)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)
    for folded, stacked in zip(grads[0], grads[1]):
        assert torch.allclose(folded, stacked, atol=1e-4, rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training precision: bf16 rounding only
        low = head(features)
    assert low.dtype == torch.bfloat16
    assert (low.float() - outputs[1].detach()).abs().max() < 0.05 * outputs[1].abs().max()


def _reloaded_without_config_key(tmp_path, config: ModelConfig, key: str):
    """Save a model, drop ``key`` from its saved config (as the code before that option wrote
    it), reload it and check it gives the same logits; returns (loaded model, bundle)."""
    import json

    model = build_model(config, num_tasks=3, num_modalities=2, patch_size=[32] * 3)
    save_model(tmp_path / "m", model)
    spec_path = tmp_path / "m" / "spec.json"
    spec = json.loads(spec_path.read_text())
    del spec["network"]["config"][key]
    spec_path.write_text(json.dumps(spec))
    loaded, bundle = load_model(tmp_path / "m")
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(image, torch.tensor([[0]]), torch.tensor([0])).logits,
                           loaded(image, torch.tensor([[0]]), torch.tensor([0])).logits)
    return loaded, bundle


def test_model_saved_before_calibration_existed_still_loads(tmp_path) -> None:
    loaded, _ = _reloaded_without_config_key(tmp_path, ModelConfig(prototype_logit="dot"), "prototype_logit")
    assert loaded.logit_calibration is None


def test_model_saved_before_the_feature_head_existed_loads_as_linear(tmp_path) -> None:
    assert ModelConfig().feature_head == "mlp"  # the default for new models
    loaded, bundle = _reloaded_without_config_key(tmp_path, ModelConfig(feature_head="linear"), "feature_head")
    assert bundle.network.config.feature_head == "linear" and loaded.feature_projection is None


# --------------------------------------------------------------------------------------------
# EMA window, float32 tiny maps, the universal ResUNet
# --------------------------------------------------------------------------------------------
def test_ema_window_is_capped_by_the_run_length() -> None:
    ema = ModelEMA(nn.Linear(2, 2), decay=0.99)
    ema.cap_window(200, 0.1)  # 20-step window
    assert ema.decay == pytest.approx(0.95)
    long = ModelEMA(nn.Linear(2, 2), decay=0.99)
    long.cap_window(100_000, 0.1)
    assert long.decay == 0.99
    fixed = ModelEMA(nn.Linear(2, 2), decay=0.99)
    fixed.cap_window(200, None)
    assert fixed.decay == 0.99


def test_tiny_feature_maps_are_convolved_in_float32_under_cpu_autocast() -> None:
    conv = PreActConv(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small = conv(torch.randn(1, 8, 2, 2, 2))
        large = conv(torch.randn(1, 8, 8, 8, 8))
    assert small.dtype == torch.float32
    assert large.dtype == torch.bfloat16


def test_universal_resunet_has_one_output_per_task_of_the_training_datasets(small_cache, tmp_path) -> None:
    from hermes.training.trainer import train

    catalog_path, cache = small_cache
    config = TrainConfig.model_validate({
        "catalog": str(catalog_path), "cache": str(cache), "output": str(tmp_path / "shared"),
        "steps": 2, "precision": "fp32", "model": {"architecture": "resunet", "preset": "tiny"},
        "data": {"patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0, "val_fraction": 0.0},
        "optim": {"warmup_steps": 1},
    })
    result = train(config, progress=False)
    model, bundle = load_model(result.model_dir)
    catalog = load_catalog(catalog_path)
    all_tasks = sorted(t for e in catalog.datasets if not e.test_only for t in e.task_ids)
    assert bundle.paradigm == "universal"
    assert bundle.network.task_ids_of_model == all_tasks
    entry_a, entry_b = catalog.datasets[0], catalog.datasets[1]
    with torch.no_grad():
        for entry in (entry_a, entry_b):
            out = model(torch.randn(1, 1, 32, 32, 32), torch.tensor([entry.task_ids]), torch.tensor([entry.modality_id]))
            assert out.logits.shape[1] == len(entry.task_ids)


@pytest.mark.parametrize("preset", ["paper", "paper-recipe"])
def test_paper_presets_switch_every_recipe_option_back(preset) -> None:
    from hermes.config import deep_merge, load_preset

    config = TrainConfig.model_validate(deep_merge(load_preset(preset), {"catalog": "c", "cache": "k", "output": "o"}))
    default = TrainConfig.model_validate({"catalog": "c", "cache": "k", "output": "o"})
    paper = (config.loss.reduction, config.optim.param_groups, config.model.prototype_logit,
             config.ema_window_fraction, config.final_weights, config.model.feature_head, config.data.modality_dropout)
    assert paper == ("pair", "single", "dot", None, "ema", "linear", 0.0)
    ours = (default.loss.reduction, default.optim.param_groups, default.model.prototype_logit,
            default.ema_window_fraction, default.final_weights, default.model.feature_head)
    assert all(a != b for a, b in zip(paper, ours))
