"""Hermes model family: shapes, padding/subset invariance, gradients, ablations, baselines, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from hermes.bundle import ModelBundle
from hermes.config import ModelConfig, validate
from hermes.errors import ConfigError, ModelError
from hermes.models.baselines import dynunet_kernels_strides
from hermes.models.registry import build_model, count_parameters, load_model, save_model

T, M = 12, 4  # tasks and modalities in the catalog; null task id = T, unknown modality = M
NULL = T
SIZE = 32


def make(arch: str = "hermes_resunet", seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(architecture=arch, preset="tiny", **overrides), T, M).eval()


def image(batch: int = 2, seed: int = 1, size: tuple[int, int, int] = (SIZE, SIZE, SIZE)) -> torch.Tensor:
    return torch.randn(batch, 1, *size, generator=torch.Generator().manual_seed(seed))


HERMES = ["hermes_resunet", "hermes_medformer"]


@pytest.mark.parametrize("arch", HERMES)
def test_mixed_task_lists_in_one_batch(arch: str) -> None:
    model = make(arch, deep_supervision=True)
    task_ids = torch.tensor([[0, 3, 5, 7], [2, 9, NULL, NULL]])
    out = model(image(), task_ids, torch.tensor([1, M]))  # second sample: unknown modality
    assert out.logits.shape == (2, 4, SIZE, SIZE, SIZE)
    assert out.logits.dtype == torch.float32
    assert out.modality_logits is not None and out.modality_logits.shape == (2, M)
    assert [tuple(d.shape) for d in out.deep_supervision] == [(2, 4, 16, 16, 16), (2, 4, 8, 8, 8)]
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", HERMES)
def test_padding_changes_nothing_in_real_tasks(arch: str) -> None:
    model = make(arch)
    x = image(batch=1)
    with torch.no_grad():
        plain = model(x, torch.tensor([[3, 5]]), torch.tensor([0])).logits
        padded = model(x, torch.tensor([[3, 5, NULL, NULL, NULL]]), torch.tensor([0])).logits
        # Garbage ids in masked slots are replaced by NULL: the mask, not the id, decides.
        mask = torch.tensor([[True, True, False, False]])
        masked = model(x, torch.tensor([[3, 5, 8, 0]]), torch.tensor([0]), task_mask=mask).logits
        # A sample's outputs do not depend on the other samples of the batch and their task counts.
        batch = torch.cat([x, image(batch=1, seed=7)])
        mixed = model(batch, torch.tensor([[3, 5, NULL, NULL], [1, 2, 4, 6]]), torch.tensor([0, 2])).logits
    # Only float rounding may differ (attention kernels block differently for other key counts);
    # a leak through the padded tokens would change logits by orders of magnitude more.
    torch.testing.assert_close(padded[:, :2], plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(masked[:, :2], plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[:1, :2], plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", HERMES)
def test_task_order_permutes_logits(arch: str) -> None:
    """The task list is a set: no positional encoding, so reordering permutes the outputs."""
    model = make(arch)
    x = image(batch=1)
    with torch.no_grad():
        a = model(x, torch.tensor([[1, 4, 6]]), torch.tensor([0])).logits
        b = model(x, torch.tensor([[6, 1, 4]]), torch.tensor([0])).logits
    torch.testing.assert_close(b, a[:, [2, 0, 1]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", HERMES)
def test_requested_output_subset_equals_full_request(arch: str) -> None:
    """The paper's design (prompt = context): same prompt, fewer outputs, identical logits."""
    model = make(arch)
    x = image(batch=2)
    prompt, modality = torch.tensor([[1, 4, 6, 9], [2, 3, 5, 7]]), torch.tensor([0, 1])
    with torch.no_grad():
        full = model(x, prompt, modality)
        subset = model(x, prompt, modality, output_tasks=[3, 1])
    assert subset.logits.shape[1] == 2
    torch.testing.assert_close(subset.logits, full.logits[:, [3, 1]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(subset.modality_logits, full.modality_logits)
    with pytest.raises(ValueError, match="output_tasks"):
        model(x, prompt, modality, output_tasks=[4])


@pytest.mark.parametrize("arch", HERMES)
def test_subset_request_equals_full_request_without_task_conditioning(arch: str) -> None:
    model = make(arch, task_conditioned_features=False)
    x = image(batch=1)
    with torch.no_grad():
        full = model(x, torch.tensor([[1, 4, 6, 9]]), torch.tensor([0])).logits
        subset = model(x, torch.tensor([[6]]), torch.tensor([0])).logits
    torch.testing.assert_close(subset, full[:, 2:3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", HERMES)
def test_gradients_reach_the_requested_priors_only(arch: str) -> None:
    model = make(arch).train()
    task_ids = torch.tensor([[2, 5, NULL], [7, NULL, NULL]])
    valid = task_ids != NULL
    out = model(image(), task_ids, torch.tensor([0, 3]))
    loss = out.logits[valid].sigmoid().mean() + out.modality_logits.logsumexp(1).mean()
    loss.backward()
    for pool in model.priors.pools.values():
        grad = pool.task_tokens.grad
        touched = grad.abs().sum(1) > 0
        assert touched[[2, 5, 7]].all()
        assert not touched[[0, 1, 3, 4, 6, 8, 9, 10, 11, NULL]].any()  # incl. NULL: padding is inert
        modality_touched = pool.modality_tokens.grad.abs().sum((1, 2)) > 0
        assert modality_touched.tolist() == [True, False, False, True, False]


def test_forward_is_deterministic_under_a_fixed_seed() -> None:
    x, ids, mod = image(), torch.tensor([[1, 2], [3, NULL]]), torch.tensor([0, 1])
    with torch.no_grad():
        a = make(seed=3)(x, ids, mod).logits
        b = make(seed=3)(x, ids, mod).logits
    assert torch.equal(a, b)


ABLATIONS = [
    ("hermes_resunet", {"modality_priors": False}),
    ("hermes_resunet", {"fusion_stages": ["enc2", "enc3", "bottleneck"]}),  # no decoder fusion
    ("hermes_resunet", {"fusion_stages": ["bottleneck", "dec2"], "fusion_blocks": [2, 1]}),  # fewer scales
    ("hermes_resunet", {"multiscale_prototypes": False}),
    ("hermes_resunet", {"prototype_dim": 16, "norm": "group"}),
    ("hermes_medformer", {"modality_priors": False, "multiscale_prototypes": False}),
    ("hermes_medformer", {"fusion_stages": ["enc3", "bottleneck"]}),
]


@pytest.mark.parametrize(("arch", "overrides"), ABLATIONS)
def test_ablations_build_and_run(arch: str, overrides: dict) -> None:
    model = make(arch, **overrides)
    out = model(image(), torch.tensor([[1, 2], [3, NULL]]), torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2, SIZE, SIZE, SIZE) and torch.isfinite(out.logits).all()
    assert (out.modality_logits is None) == (not overrides.get("modality_priors", True))
    stages = overrides.get("fusion_stages", ["enc2", "enc3", "bottleneck", "dec1", "dec2"])
    assert list(model.priors.pools) == stages
    widths = {"enc2": 32, "enc3": 64, "bottleneck": 64, "dec1": 64, "dec2": 32}
    used = stages if overrides.get("multiscale_prototypes", True) else stages[-1:]
    assert model.prototype_head.norm.normalized_shape[0] == sum(widths[s] for s in used)


def test_channels_last_and_bf16_autocast() -> None:
    x, ids, mod = image(), torch.tensor([[1, 2], [3, NULL]]), torch.tensor([0, 1])
    for arch in HERMES:
        model = make(arch)
        with torch.no_grad():
            reference = model(x, ids, mod).logits
            model = model.to(memory_format=torch.channels_last_3d)
            cl = model(x.contiguous(memory_format=torch.channels_last_3d), ids, mod).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model(x.contiguous(memory_format=torch.channels_last_3d), ids, mod)
        torch.testing.assert_close(cl, reference, rtol=1e-3, atol=1e-3)
        assert bf16.logits.dtype == torch.float32 and bf16.modality_logits.dtype == torch.float32
        # bf16 keeps ~3 significant digits: the masks must still agree almost everywhere.
        agree = ((bf16.logits > 0) == (reference > 0)).float().mean()
        assert agree > 0.97, f"{arch}: bf16 and fp32 masks agree on only {agree:.3f} of voxels"


def test_bf16_channels_last_training_step_has_finite_gradients() -> None:
    model = make().train().to(memory_format=torch.channels_last_3d)
    x = image().contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([[1, 2], [3, NULL]]), torch.tensor([0, 1]))
    (out.logits.sigmoid().mean() + out.modality_logits.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_inconsistent_ablation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs modality_priors"):
        validate(ModelConfig, {"modality_priors": False, "task_conditioned_features": False})


def test_anisotropic_downsampling() -> None:
    model = make(downsample=[[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]])
    out = model(image(batch=1, size=(32, 32, 8)), torch.tensor([[0]]), torch.tensor([0]))
    assert out.logits.shape == (1, 1, 32, 32, 8)


def test_bad_ids_raise_clear_errors() -> None:
    model = make()
    with pytest.raises(ModelError, match=r"task ids must be in 0\.\.12"):
        model(image(batch=1), torch.tensor([[13]]), torch.tensor([0]))
    with pytest.raises(ModelError, match="modality ids"):
        model(image(batch=1), torch.tensor([[1]]), torch.tensor([M + 1]))
    with pytest.raises(ValueError, match="at least one real"):
        model(image(batch=1), torch.tensor([[NULL]]), torch.tensor([0]))


@pytest.mark.parametrize("arch", ["resunet", "medformer", "dynunet"])
def test_baselines_answer_global_task_ids(arch: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(architecture=arch, preset="tiny", deep_supervision=arch != "dynunet")
    model = build_model(config, T, M, task_ids_of_model=[4, 7, 9], patch_size=[SIZE] * 3).eval()
    x = image()
    with torch.no_grad():
        out = model(x, torch.tensor([[4, 7, 9], [9, 4, NULL]]), torch.tensor([0, 1]))
        swapped = model(x, torch.tensor([[9, 4, 7], [4, 9, NULL]]), torch.tensor([0, 1]))
    assert out.logits.shape == (2, 3, SIZE, SIZE, SIZE) and out.modality_logits is None
    torch.testing.assert_close(swapped.logits[0], out.logits[0, [2, 0, 1]])
    torch.testing.assert_close(swapped.logits[1, :2], out.logits[1, [1, 0]])
    if arch != "dynunet":
        assert [tuple(d.shape[2:]) for d in out.deep_supervision] == [(16, 16, 16), (8, 8, 8)]
    with pytest.raises(ModelError, match=r"predicts tasks \[4, 7, 9\], not \[5\]"):
        model(x, torch.tensor([[4, 5], [7, NULL]]), torch.tensor([0, 1]))


def test_swinunetr_adapter() -> None:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(architecture="swinunetr", preset="tiny"), T, M, task_ids_of_model=[0, 1]
    ).eval()
    with torch.no_grad():
        out = model(image(batch=1, size=(64, 32, 32)), torch.tensor([[1]]), torch.tensor([0]))
    assert out.logits.shape == (1, 1, 64, 32, 32)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(image(batch=1, size=(48, 32, 32)), torch.tensor([[1]]), torch.tensor([0]))


def test_dynunet_kernels_and_strides_follow_the_patch() -> None:
    kernels, strides = dynunet_kernels_strides([64, 64, 32])
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]  # stop below 8 voxels
    assert len(kernels) == len(strides) and kernels[-1] == [3, 3, 3]
    _, strides = dynunet_kernels_strides([128, 128, 32], spacing=[1.0, 1.0, 4.0])
    assert strides[1] == [2, 2, 1]  # the coarse axis waits until the others catch up


def test_base_preset_matches_the_paper_parameter_count() -> None:
    model = build_model(ModelConfig(preset="base"), 72, 5)
    assert abs(count_parameters(model) - 60.88e6) < 0.05e6  # paper: 60.88 M for Hermes-R


@pytest.mark.parametrize("arch", ["hermes_medformer", "resunet", "dynunet"])
def test_save_load_round_trip_is_bit_exact(tmp_path, arch: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(architecture=arch, preset="tiny")
    model = build_model(config, T, M, task_ids_of_model=[2, 3], patch_size=[32, 32, 32]).eval()
    ids, mod = torch.tensor([[2, 3]]), torch.tensor([1])
    with torch.no_grad():
        before = model(image(batch=1), ids, mod).logits
    save_model(tmp_path / "model", model, ModelBundle(task_names=[f"t{i}" for i in range(T)], network=model.build_spec))
    loaded, bundle = load_model(tmp_path / "model")
    with torch.no_grad():
        after = loaded(image(batch=1), ids, mod).logits
    assert torch.equal(before, after)
    assert bundle.task_names[0] == "t0" and bundle.network.num_tasks == T


def test_load_model_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ModelError, match=r"spec\.json: not found"):
        load_model(tmp_path / "nothing")
    directory = tmp_path / "model"
    save_model(directory, make())
    (directory / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="corrupt"):
        load_model(directory)
    save_model(directory, make())
    spec = json.loads((directory / "spec.json").read_text())
    spec["network"]["num_tasks"] = T + 3
    (directory / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match=r"does not match spec\.json"):
        load_model(directory)
    (directory / "spec.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(directory)


def test_swinunetr_rejects_patches_it_cannot_train_on() -> None:
    with pytest.raises(ConfigError, match="at least 64"):
        build_model(ModelConfig(architecture="swinunetr", preset="tiny"), T, M, task_ids_of_model=[1], patch_size=[32, 64, 64])
