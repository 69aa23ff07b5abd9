"""Gaussian-weighted sliding-window inference whose memory does not grow with tasks x volume.

A universal model predicts up to dozens of task channels for a CT of 10^7..10^8 voxels; MONAI's
``sliding_window_inference`` stitches them in float32 plus a count map, i.e. more than
``4 x T x V`` bytes. Here the blending weight (one float32 volume shared by all tasks) is
computed up front from the window grid, each window adds ``logits x importance / weight``, its
share of the final weighted mean, and the sums are kept in float16: ``2 x T x V`` bytes, no
normalisation pass, and no overflow on the way (every partial sum is bounded by the largest
logit; logits beyond float16's range become +-inf, i.e. probability 1/0). Window positions and
the Gaussian importance map are MONAI's own (``dense_patch_slices``, ``compute_importance_map``),
so both stitchers evaluate the network at the same places; the results agree up to float16
rounding, and exactly (1e-5) with ``accumulate_dtype=float32``. bench/inference_speed.py
measures speed, memory and the difference.

The network is any callable ``(b, C, *window) -> (b, T, *window)`` logits: the Hermes model
needs task ids and a modality id, which the predictor binds in a closure.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from tqdm.auto import tqdm

from hermes.runtime import Precision, choose_device, resolve_autocast_dtype, resolve_channels_last

Network = Callable[[torch.Tensor], torch.Tensor]


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All non-empty subsets of the spatial mirror axes (nnU-Net's mirroring TTA: 2^k passes)."""
    axes = sorted({int(axis) for axis in mirror_axes})
    for axis in axes:
        if axis not in (0, 1, 2):
            raise ValueError(f"mirror axes are spatial axes 0, 1, 2; got {axis}")
    return [combo for r in range(1, len(axes) + 1) for combo in itertools.combinations(axes, r)]


def window_slices(
    shape: Sequence[int], window: Sequence[int], overlap: float
) -> list[tuple[slice, slice, slice]]:
    """MONAI's window placement (interval ``int(window * (1 - overlap))``, last window flush with
    the end), so this stitcher and ``monai.inferers.sliding_window_inference`` are comparable."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    interval = [
        size if size == win else max(int(win * (1.0 - overlap)), 1)
        for size, win in zip(shape, window)
    ]
    return [tuple(s) for s in dense_patch_slices(tuple(shape), tuple(window), interval)]  # type: ignore[misc]


def pad_to(image: torch.Tensor, pads: Sequence[tuple[int, int]], pad_value: Sequence[float] | float = 0.0) -> torch.Tensor:
    """``(1, C, *S)`` padded by ``pads`` per axis with a constant per channel.

    The constant must be what training padded with (the sampler fills parts of a patch outside
    the volume with the case's ``pad_value``, the per-channel minimum of the normalised image).
    Zero is the mean intensity after a z-score: an MR volume smaller than the window, padded
    with zeros, sat in a bright frame the network had never seen, and realmini HippocampusMR
    (volumes of about 35x50x35 voxels, 48^3 windows) scored Dice 0.05.
    """
    if not any(p for pair in pads for p in pair):
        return image
    channels = image.shape[1]
    values = torch.as_tensor(pad_value, dtype=image.dtype, device=image.device).flatten()
    if values.numel() == 1:
        values = values.expand(channels)
    if values.numel() != channels:
        raise ValueError(f"pad_value has {values.numel()} entries for an image of {channels} channels")
    shape = [n + lo + hi for n, (lo, hi) in zip(image.shape[2:], pads)]
    out = values.view(1, channels, 1, 1, 1).expand(1, channels, *shape).clone()
    inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, image.shape[2:]))
    out[(slice(None), slice(None), *inner)] = image
    return out


def _symmetric_padding(shape: Sequence[int], window: Sequence[int]) -> list[tuple[int, int]]:
    pads = []
    for size, win in zip(shape, window):
        diff = max(win - size, 0)
        pads.append((diff // 2, diff - diff // 2))
    return pads


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class WindowRunner:
    """Runs the network on one window batch: device transfer, layout, autocast, mirroring TTA."""

    def __init__(
        self,
        network: Network,
        device: torch.device,
        precision: Precision = "auto",
        channels_last: bool | Literal["auto"] = "auto",
        mirror_axes: Sequence[int] = (),
    ) -> None:
        self.network = network
        self.device = device
        self.autocast_dtype = resolve_autocast_dtype(precision, device)
        self.channels_last = resolve_channels_last(channels_last, device)
        self.mirrors = mirror_combinations(mirror_axes)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        with _autocast(self.device, self.autocast_dtype):
            out = self.network(batch)
        if out.ndim != batch.ndim or out.shape[0] != batch.shape[0] or out.shape[2:] != batch.shape[2:]:
            raise RuntimeError(
                f"network returned shape {tuple(out.shape)} for a window batch {tuple(batch.shape)};"
                " expected (b, T, *window)"
            )
        return out.float()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        out = self._forward(batch)
        for axes in self.mirrors:
            dims = [axis + 2 for axis in axes]
            out += torch.flip(self._forward(torch.flip(batch, dims)), dims)
        if self.mirrors:
            out /= len(self.mirrors) + 1
        return out


def _batches(slices: list[tuple[slice, ...]], size: int) -> Iterator[list[tuple[slice, ...]]]:
    for start in range(0, len(slices), size):
        yield slices[start : start + size]


@torch.inference_mode()
def sliding_window_inference(
    image: torch.Tensor,
    network: Network,
    window_size: Sequence[int],
    *,
    overlap: float = 0.5,
    window_batch_size: int = 2,
    blend: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 0.125,
    mirror_axes: Sequence[int] = (),
    device: str | torch.device | None = None,
    precision: Precision = "auto",
    channels_last: bool | Literal["auto"] = "auto",
    accumulate_dtype: torch.dtype = torch.float16,
    progress: bool = False,
    pad_value: Sequence[float] | float = 0.0,
) -> torch.Tensor:
    """Blend window logits over a whole volume.

    Args:
        image: ``(1, C, X, Y, Z)`` float tensor; it stays on its device (the accumulator lives
            there too) and windows are moved to ``device`` for the network.
        network: ``(b, C, *window) -> (b, T, *window)`` logits.
        window_size: the model's patch size; volumes smaller than it are padded symmetrically
            with ``pad_value`` (per channel; pass the preprocessing's, which training padded
            with: see :func:`pad_to`) and cropped back.
        accumulate_dtype: dtype of the running sums and of the result. float16 (default)
            halves the stitching memory (probabilities within ~1e-3 of float32); float32 gives
            MONAI's result.

    Returns:
        ``(T, X, Y, Z)`` blended logits in ``accumulate_dtype`` on ``image.device``.
    """
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"expected an image of shape (1, C, X, Y, Z), got {tuple(image.shape)}")
    if len(window_size) != 3 or min(window_size) < 1:
        raise ValueError(f"window_size needs three positive sizes, got {window_size}")
    if window_batch_size < 1:
        raise ValueError("window_batch_size must be >= 1")
    net_device = choose_device(device) if device is not None else image.device
    runner = WindowRunner(network, net_device, precision, channels_last, mirror_axes)
    window = tuple(int(w) for w in window_size)
    original_shape = tuple(image.shape[2:])

    pads = _symmetric_padding(original_shape, window)
    image = pad_to(image, pads, pad_value)
    shape = tuple(image.shape[2:])
    slices = window_slices(shape, window, overlap)

    store = image.device
    importance = compute_importance_map(window, mode=blend, sigma_scale=sigma_scale, device=store)
    importance = importance.to(torch.float32)
    # The blending weight depends only on the window grid: computed up front, one channel.
    weight = torch.zeros(shape, dtype=torch.float32, device=store)
    for sl in slices:
        weight[sl] += importance

    # Each window adds logits x importance / total weight: its share of the final weighted
    # mean. The running sums are then already at the final scale (bounded by the largest
    # logit, so float16 cannot overflow on the way) and no normalisation pass over T x V is
    # needed at the end.
    output: torch.Tensor | None = None
    exact = accumulate_dtype == torch.float32
    batches = _batches(slices, window_batch_size)
    n_batches = math.ceil(len(slices) / window_batch_size)
    for group in tqdm(batches, total=n_batches, desc="sliding window", unit="batch", disable=not progress):
        windows = torch.cat([image[(slice(None), slice(None), *sl)] for sl in group], dim=0)
        logits = runner(windows).to(store)
        if output is None:
            output = torch.zeros((logits.shape[1], *shape), dtype=accumulate_dtype, device=store)
        for index, sl in enumerate(group):
            share = importance / weight[sl]
            contribution = logits[index].mul_(share)
            output[(slice(None), *sl)] += contribution if exact else contribution.to(accumulate_dtype)
    assert output is not None  # at least one window always exists
    if any(p for pair in pads for p in pair):
        crop = tuple(slice(lo, lo + size) for (lo, _), size in zip(pads, original_shape))
        output = output[(slice(None), *crop)].clone()
    return output


def central_window(
    image: torch.Tensor, window_size: Sequence[int], pad_value: Sequence[float] | float = 0.0
) -> torch.Tensor:
    """The window-sized crop at the volume's centre (padded with ``pad_value`` when the volume
    is smaller); used to run the modality head once instead of over every window."""
    pads = _symmetric_padding(image.shape[2:], window_size)
    image = pad_to(image, pads, pad_value)
    shape = image.shape[2:]
    starts = [(size - win) // 2 for size, win in zip(shape, window_size)]
    sl = tuple(slice(s, s + int(w)) for s, w in zip(starts, window_size))
    return image[(slice(None), slice(None), *sl)]
