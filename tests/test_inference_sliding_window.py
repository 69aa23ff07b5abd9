"""Sliding-window stitching against MONAI, padding, mirroring TTA, bounded accumulator dtype."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference as monai_swi

from hermes.inference.sliding_window import (
    central_window,
    mirror_combinations,
    sliding_window_inference,
    window_slices,
)


def _net(seed: int = 0, out: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, out, 3, padding=1)
    ).eval()


@pytest.mark.parametrize("shape", [(40, 30, 21), (12, 50, 16)])  # second: smaller than the window on 2 axes
def test_matches_monai_gaussian(shape: tuple[int, int, int]) -> None:
    net = _net()
    image = torch.randn(1, 1, *shape)
    ours = sliding_window_inference(
        image, net, (16, 16, 16), overlap=0.5, window_batch_size=3, precision="fp32", channels_last=False,
        accumulate_dtype=torch.float32,
    )
    with torch.no_grad():
        ref = monai_swi(image, (16, 16, 16), 3, net, overlap=0.5, mode="gaussian")[0]
    assert ours.shape == ref.shape == (3, *shape)
    assert torch.allclose(ours, ref, atol=1e-5)
    half = sliding_window_inference(image, net, (16, 16, 16), overlap=0.5, precision="fp32", channels_last=False)
    assert half.dtype == torch.float16  # the default accumulator: half the memory of MONAI's
    assert (torch.sigmoid(half.float()) - torch.sigmoid(ref)).abs().max() < 2e-3


def test_mirroring_averages_flipped_passes() -> None:
    net = _net(1, out=2)
    image = torch.randn(1, 1, 16, 16, 16)  # one window: the blend is the identity
    tta = sliding_window_inference(
        image, net, (16, 16, 16), mirror_axes=(0, 2), precision="fp32", accumulate_dtype=torch.float32
    )
    with torch.no_grad():
        passes = [net(image)]
        for dims in ([2], [4], [2, 4]):
            passes.append(torch.flip(net(torch.flip(image, dims)), dims))
    expected = torch.stack(passes).mean(0)[0]
    assert torch.allclose(tta, expected, atol=1e-5)
    assert mirror_combinations((0, 1, 2)) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def test_windows_cover_the_volume_and_float16_output_stays_finite() -> None:
    shape, window = (50, 33, 16), (16, 16, 16)
    slices = window_slices(shape, window, 0.5)
    covered = torch.zeros(shape, dtype=torch.int32)
    for sl in slices:
        covered[sl] += 1
    assert int(covered.min()) >= 1
    # Sums are kept at the final scale: large logits survive float16; beyond its range they
    # saturate to +inf (probability 1), never NaN.
    def constant(value: float):
        return lambda x: torch.full((x.shape[0], 1, *x.shape[2:]), value)

    big = sliding_window_inference(torch.zeros(1, 1, *shape), constant(3e4), window, precision="fp32")
    assert torch.allclose(big.float(), torch.full_like(big.float(), 3e4), rtol=2e-3)
    huge = sliding_window_inference(torch.zeros(1, 1, *shape), constant(1e6), window, precision="fp32")
    assert not torch.isnan(huge).any() and bool((torch.sigmoid(huge.float()) == 1).all())


def test_bad_network_output_is_reported() -> None:
    with pytest.raises(RuntimeError, match="expected"):
        sliding_window_inference(torch.zeros(1, 1, 8, 8, 8), lambda x: x[:, :, :4], (8, 8, 8), precision="fp32")


def test_central_window_pads_small_volumes() -> None:
    image = torch.arange(6 * 20 * 9, dtype=torch.float32).reshape(1, 1, 6, 20, 9)
    window = central_window(image, (8, 8, 8))
    assert window.shape == (1, 1, 8, 8, 8)
    assert float(window[0, 0, 1, 0, 0]) == float(image[0, 0, 0, 6, 0])  # x padded by 1, y starts at 6


def test_bf16_autocast_runs() -> None:
    net = _net()
    image = torch.randn(1, 1, 20, 20, 20)
    fp32 = sliding_window_inference(image, net, (16, 16, 16), precision="fp32")
    bf16 = sliding_window_inference(image, net, (16, 16, 16), precision="bf16", channels_last=True)
    assert (torch.sigmoid(fp32.float()) - torch.sigmoid(bf16.float())).abs().max() < 0.05


def test_volumes_smaller_than_the_window_are_padded_with_the_training_pad_value() -> None:
    """The sampler fills patch parts outside the volume with the case's pad value (the
    normalised minimum); inference must show the network the same frame, not zeros."""
    from hermes.inference.sliding_window import central_window, sliding_window_inference

    image = torch.ones(1, 1, 4, 4, 4)

    def mean_of_window(window: torch.Tensor) -> torch.Tensor:
        return window.mean(dim=(1, 2, 3, 4), keepdim=True).expand(-1, 1, *window.shape[2:]).clone()

    out = sliding_window_inference(image, mean_of_window, (8, 8, 8), precision="fp32",
                                   accumulate_dtype=torch.float32, pad_value=-2.0)
    expected = (64 * 1.0 + (512 - 64) * -2.0) / 512
    assert out.shape == (1, 4, 4, 4)
    assert torch.allclose(out, torch.full_like(out, expected))
    centre = central_window(image, (8, 8, 8), [-2.0])
    assert centre.shape == (1, 1, 8, 8, 8) and centre.min() == -2.0 and centre.sum() == 64 + 448 * -2.0


def test_predictor_and_validation_pass_the_preprocessing_pad_value(monkeypatch, tmp_path) -> None:
    import numpy as np
    from inference_helpers import make_model_dir

    import hermes.inference.predictor as predictor_module
    from hermes.config import InferenceConfig
    from hermes.data.imageio import save_image
    from hermes.inference import Predictor

    seen: list = []
    real = predictor_module.sliding_window_inference

    def spy(*args, **kwargs):
        seen.append(kwargs.get("pad_value"))
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "sliding_window_inference", spy)
    model_dir = make_model_dir(tmp_path / "model", datasets=(("MRSet", "T1", ("hippo",), None),))
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 20, (12, 10, 8)).astype(np.float32)
    path = save_image(tmp_path / "mr.nii.gz", volume, np.eye(4))
    Predictor(model_dir, device="cpu", config=InferenceConfig(overlap=0.25)).predict(path, modality="T1", progress=False)
    assert seen and seen[0] is not None
    assert min(seen[0]) < -0.5  # the z-scored volume's minimum, not 0 (the mean)
