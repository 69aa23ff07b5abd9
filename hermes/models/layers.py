"""Convolutional building blocks shared by the backbones (CBIM ``conv_layers.py`` equivalents)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormName = Literal["instance", "batch", "group"]


def make_norm(name: NormName, channels: int) -> nn.Module:
    """InstanceNorm3d(affine=False, eps=1e-4) is the reference's `in`; BN/GN for ablations.

    The plain ``nn.InstanceNorm3d`` is used on purpose: on this CPU a pre-activation block with
    it runs faster under channels_last_3d + bf16 (258 ms fwd+bwd, 2x16x64^3) than group-norm
    formulations that keep the memory format (440-880 ms).
    """
    if name == "instance":
        return nn.InstanceNorm3d(channels, eps=1e-4)
    if name == "batch":
        return nn.BatchNorm3d(channels, eps=1e-4)
    if name == "group":
        return nn.GroupNorm(min(8, channels), channels, eps=1e-4)
    raise ValueError(f"unknown norm {name!r}")


TINY_MAP = 4  # voxels per axis below which PreActConv computes in float32 on CPU


class MaxPool(nn.MaxPool3d):
    """Max-pooling in the input's dtype: CPU autocast's fp32 policy for ``max_pool3d`` would only
    add two full-size copies (a max is exact in bf16)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


class DepthwiseConv3d(nn.Conv3d):
    """Grouped 3D convolution computed in float32 on CPU, even under bf16 autocast.

    Measured on this CPU (one thread, fwd+bwd of a 3^3 depthwise conv on 2x64x32^3):
    bf16 channels_last 638 ms, fp32 channels_last 189 ms, fp32 NCDHW 364 ms. The backward of
    oneDNN's bf16 depthwise kernel is the slow part; CUDA keeps autocast's choice.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.to(self.weight.dtype))


def same_padding(kernel: Sequence[int]) -> list[int]:
    return [k // 2 for k in kernel]


class PreActConv(nn.Module):
    """norm -> ReLU -> conv (the reference ``ConvNormAct(preact=True)``)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: Sequence[int] = (3, 3, 3),
        norm: NormName = "instance",
        act: bool = True,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, in_ch)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()
        conv = DepthwiseConv3d if groups > 1 else nn.Conv3d
        self.conv = conv(in_ch, out_ch, kernel, padding=same_padding(kernel), groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm(x))
        if h.device.type == "cpu" and min(h.shape[2:]) < TINY_MAP and torch.is_autocast_enabled("cpu"):
            # Maps under 4 voxels per axis (a 32^3 patch's bottleneck is 2^3) are convolved in
            # float32: there the CPU bf16 conv (torch 2.13, oneDNN) intermittently returned
            # weight gradients of ~1e38 (inf norm) in ~1 of 5 steps of a 32^3 tiny model, and
            # those optimiser steps were skipped. At these sizes float32 costs nothing.
            with torch.autocast("cpu", enabled=False):
                return self.conv(h.float())
        return self.conv(h)


class BasicBlock(nn.Module):
    """Pre-activation residual block: two (IN -> ReLU -> conv3) plus a conv3 shortcut if widths differ."""

    def __init__(
        self, in_ch: int, out_ch: int, norm: NormName = "instance", kernel: Sequence[int] = (3, 3, 3)
    ) -> None:
        super().__init__()
        self.conv1 = PreActConv(in_ch, out_ch, kernel, norm)
        self.conv2 = PreActConv(out_ch, out_ch, kernel, norm)
        self.shortcut: nn.Module = (
            nn.Identity() if in_ch == out_ch else PreActConv(in_ch, out_ch, kernel, norm)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x)) + self.shortcut(x)


def blocks(in_ch: int, out_ch: int, count: int, norm: NormName) -> nn.Sequential:
    """`count` BasicBlocks, the first changing the width (at least one block)."""
    layers = [BasicBlock(in_ch, out_ch, norm)]
    layers += [BasicBlock(out_ch, out_ch, norm) for _ in range(max(count, 1) - 1)]
    return nn.Sequential(*layers)


def upsample_like(x: Tensor, skip: Tensor) -> Tensor:
    """Trilinear up-sampling of ``x`` to the skip's spatial size, in the skip's dtype.

    Under bf16 autocast the two inputs of the following concat may differ in dtype (fusion
    residuals stay float32): the cast makes the concat explicit instead of relying on promotion.
    """
    up = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=True)
    return up.to(skip.dtype)


def concat_skip(x: Tensor, skip: Tensor) -> Tensor:
    """[skip, upsampled x] along channels, keeping the skip's memory format."""
    out = torch.cat([skip, upsample_like(x, skip)], dim=1)
    if skip.is_contiguous(memory_format=torch.channels_last_3d):
        out = out.contiguous(memory_format=torch.channels_last_3d)
    return out
