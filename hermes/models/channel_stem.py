"""The per-channel stem of ``model.channel_fusion: mean``: any number of input channels, each
conditioned on its modality, fused by a mean over the channels present (HeMIS-style).

A plain first convolution over stacked channels ties a network to one channel count and needs
every channel. Here one shared stem (conv3 1 -> w, then a pre-activation residual block) runs
on each channel *on its own*; its first normalisation is followed by a per-modality FiLM
(scale and shift looked up from the channel's modality id, zero-initialised: the plain block at
the start), so a T1c channel and a FLAIR channel are read differently by the same weights. The
per-channel features are then averaged over the channels present in each sample (Havaei et al.,
HeMIS, MICCAI 2016: "the mean over available modalities"), which gives the full-resolution
features the rest of the backbone reads, whatever the number of channels.

Why a mean: it is defined for any non-empty subset, has the same scale for 1 or 4 channels, and
a missing channel simply leaves it (no imputation, no zero image the network must learn to
ignore). Why FiLM after the normalisation: an instance norm removes any per-feature scale and
shift applied before it, so conditioning placed before the norm would be erased.

The conditioning is a (M + 1, 2w) table over the model's modality ids (row M: unknown), grown
like the prior pools when adaptation adds a modality (hermes/adaptation/warm_start.py).

Inputs, beside the image ``(B, C, *S)``: ``channel_ids`` ``(B, C)`` int64, the modality id of
each channel, and ``channel_mask`` ``(B, C)`` bool, True where the channel is present. Batches
mixing datasets of different channel counts pad to the batch maximum with masked channels; a
masked channel is never computed (only present channels go through the stem), so what it holds
changes nothing. Each sample needs at least one present channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hermes.models.layers import NormName, PreActConv, make_norm


class ModalityFiLM(nn.Module):
    """Normalisation, then a per-modality scale ``1 + gamma_m`` and shift ``beta_m`` per feature."""

    def __init__(self, width: int, num_modalities: int, norm: NormName) -> None:
        super().__init__()
        self.norm = make_norm(norm, width)
        self.channel_embedding = nn.Embedding(num_modalities + 1, 2 * width)
        nn.init.zeros_(self.channel_embedding.weight)  # identity at the start

    def forward(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        gamma, beta = self.channel_embedding(modality_ids).to(x.dtype).chunk(2, dim=1)
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return self.norm(x) * (1 + gamma.view(shape)) + beta.view(shape)


class ChannelStem(nn.Module):
    """One channel ``(N, 1, *S)`` -> ``(N, w, *S)``: conv3, then the residual block of the plain
    stem (``BasicBlock``) with its first normalisation conditioned on the channel's modality."""

    def __init__(self, width: int, num_modalities: int, norm: NormName) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, width, 3, padding=1, bias=False)
        self.film = ModalityFiLM(width, num_modalities, norm)
        self.conv1 = nn.Conv3d(width, width, 3, padding=1, bias=False)
        self.conv2 = PreActConv(width, width, (3, 3, 3), norm)

    def forward(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        h = self.conv(x)
        return h + self.conv2(self.conv1(F.relu(self.film(h, modality_ids))))


class ChannelFusionStem(nn.Module):
    """:class:`ChannelStem` on every present channel, averaged per sample over them."""

    def __init__(self, width: int, num_modalities: int, norm: NormName) -> None:
        super().__init__()
        self.width = width
        self.channel = ChannelStem(width, num_modalities, norm)

    def forward(self, image: Tensor, channel_ids: Tensor, channel_mask: Tensor) -> Tensor:
        b, c = image.shape[:2]
        spatial = image.shape[2:]
        flat = image.reshape(b * c, 1, *spatial)
        ids = channel_ids.reshape(-1)
        if torch.compiler.is_exporting():
            # Static shapes for an exporter: every slot computed, masked ones weighted 0.
            feats = self.channel(flat, ids).view(b, c, self.width, *spatial)
            weight = channel_mask.to(feats.dtype) / channel_mask.sum(1, keepdim=True).clamp_min(1).to(feats.dtype)
            return (feats * weight.view(b, c, 1, 1, 1, 1)).sum(1)
        present = channel_mask.reshape(-1).nonzero().squeeze(1)
        feats = self.channel(flat.index_select(0, present), ids.index_select(0, present))
        sample = torch.div(present, c, rounding_mode="floor")
        out = feats.new_zeros((b, *feats.shape[1:])).index_add_(0, sample, feats)
        if feats.is_contiguous(memory_format=torch.channels_last_3d) and not feats.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last_3d)
        count = channel_mask.sum(1).to(out.dtype)
        return out / count.view(b, *(1,) * (out.ndim - 1))


def channel_prompt(
    image: Tensor,
    modality_id: Tensor,
    num_modalities: int,
    channel_ids: Tensor | None = None,
    channel_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Checked ``(channel_ids, channel_mask)`` for ``image`` ``(B, C, *S)``.

    Defaults: a single-channel image's channel has the sample's modality id; every channel is
    present. A multi-channel image must say what its channels are (no guess: a wrong modality
    conditions the stem wrongly).
    """
    b, c = image.shape[:2]
    if channel_ids is None:
        if c != 1:
            raise ValueError(f"a {c}-channel image needs channel_ids (the modality id of each channel)")
        channel_ids = modality_id.reshape(b, 1)
    if channel_mask is None:
        channel_mask = torch.ones((b, c), dtype=torch.bool, device=image.device)
    if tuple(channel_ids.shape) != (b, c) or tuple(channel_mask.shape) != (b, c):
        raise ValueError(
            f"channel_ids {tuple(channel_ids.shape)} and channel_mask {tuple(channel_mask.shape)} must be "
            f"(batch, channels) = {(b, c)}"
        )
    if channel_ids.dtype != torch.long or channel_mask.dtype != torch.bool:
        raise ValueError("channel_ids must be int64 and channel_mask bool")
    if not torch.compiler.is_exporting():
        if bool(((channel_ids < 0) | (channel_ids > num_modalities)).any()):
            raise ValueError(f"channel_ids must be modality ids 0..{num_modalities} ({num_modalities} = unknown)")
        if not bool(channel_mask.any(dim=1).all()):
            raise ValueError("every sample needs at least one present channel (channel_mask all False)")
    return channel_ids, channel_mask


def check_all_channels(channel_mask: Tensor | None) -> None:
    """A plain first convolution (``channel_fusion: none``) reads every channel: a channel
    masked as missing is an error, not a silently zero-filled input."""
    if channel_mask is not None and not torch.compiler.is_exporting() and not bool(channel_mask.all()):
        raise ValueError(
            "this model (model.channel_fusion: none) needs every input channel; a channel is masked as missing"
        )


def reads_channels(model: nn.Module) -> bool:
    """Whether ``model`` takes ``channel_ids``/``channel_mask`` (built with ``channel_fusion:
    mean``); a DDP wrapper is looked through. Other models are called exactly as before."""
    return getattr(getattr(model, "module", model), "channel_fusion", "none") == "mean"


def channel_inputs(model: nn.Module, batch: dict, index: Tensor | None = None, repeat: int = 1) -> dict[str, Tensor]:
    """The batch's ``channel_ids``/``channel_mask`` as keyword arguments for ``model`` (empty
    when the model does not read them or the batch has none); ``index`` selects samples,
    ``repeat`` tiles the batch (MedContext's clean + masked halves)."""
    if not reads_channels(model) or "channel_ids" not in batch:
        return {}
    out = {}
    for key in ("channel_ids", "channel_mask"):
        value = batch[key]
        if index is not None:
            value = value.index_select(0, index)
        out[key] = value.repeat(repeat, 1) if repeat != 1 else value
    return out
