"""Residual U-Net backbone of Hermes-R (CBIM ``ResUNet``), with optional prior fusion stages.

Encoder: stem (conv3 + BasicBlock) at full resolution, then four steps of max-pooling and
pre-activation BasicBlocks. Decoder: trilinear up-sampling, concat with the skip, BasicBlocks.
Per-axis pooling strides support anisotropic data (e.g. [[2,2,1], [2,2,2], ...]).

With ``fusion_blocks`` (stage -> number of blocks) a :class:`PriorFusion` runs right after the
named encoder stage or decoder stage; the fused encoder features are also the skips, as in the
reference. Without it this is the plain backbone of the traditional ``resunet`` baseline.

``channel_fusion="mean"`` replaces the stem by :class:`ChannelFusionStem` (one stem per channel,
conditioned on its modality, averaged over the channels present); ``"none"`` keeps the plain
stem over stacked channels, with the parameter names models saved before the option have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from hermes.models.backbone import STAGE_LEVEL, BackboneOutput
from hermes.models.channel_stem import ChannelFusionStem
from hermes.models.fusion import PriorFusion
from hermes.models.layers import BasicBlock, MaxPool, NormName, blocks, concat_skip
from hermes.models.priors import PriorTokens

ENCODER_STAGE = {2: "enc2", 3: "enc3", 4: "bottleneck"}
DECODER_STAGE = {3: "dec1", 2: "dec2", 1: "dec3", 0: "dec4"}


class ResUNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        downsample: Sequence[Sequence[int]],
        norm: NormName = "instance",
        fusion_blocks: Mapping[str, int] | None = None,
        head_dim: int = 32,
        channel_fusion: str = "none",
        num_modalities: int = 0,
    ) -> None:
        super().__init__()
        if len(widths) != 5 or len(blocks_per_stage) != 4 or len(downsample) != 4:
            raise ValueError("ResUNet needs 5 widths, 4 blocks_per_stage and 4 downsample strides")
        self.widths = list(widths)
        w, n = self.widths, list(blocks_per_stage)
        if channel_fusion not in ("none", "mean"):
            raise ValueError(f"unknown channel_fusion {channel_fusion!r} (none or mean)")
        self.channel_fusion = channel_fusion
        self.stem: nn.Module = (
            ChannelFusionStem(w[0], num_modalities, norm)
            if channel_fusion == "mean"
            else nn.Sequential(nn.Conv3d(in_channels, w[0], 3, padding=1, bias=False), BasicBlock(w[0], w[0], norm))
        )
        self.down = nn.ModuleList(
            nn.Sequential(MaxPool(tuple(downsample[i])), blocks(w[i], w[i + 1], n[i], norm)) for i in range(4)
        )
        # up[j] produces level 3 - j; block counts mirror the encoder (reference up1..up4).
        self.up = nn.ModuleList(
            blocks(w[level + 1] + w[level], w[level], n[max(level - 1, 0)], norm) for level in (3, 2, 1, 0)
        )
        self.fusion = nn.ModuleDict(
            {
                stage: PriorFusion(w[STAGE_LEVEL[stage]], count, head_dim)
                for stage, count in (fusion_blocks or {}).items()
                if count > 0
            }
        )

    def _fuse(self, stage: str, h: Tensor, priors: Mapping[str, PriorTokens], out: BackboneOutput) -> Tensor:
        if stage not in self.fusion:
            return h
        if stage not in priors:
            raise ValueError(f"fusion stage {stage!r} needs prior tokens")
        h, out.posteriors[stage] = self.fusion[stage](h, priors[stage])
        return h

    def forward(
        self,
        x: Tensor,
        priors: Mapping[str, PriorTokens] | None = None,
        channel_ids: Tensor | None = None,
        channel_mask: Tensor | None = None,
    ) -> BackboneOutput:
        """``channel_ids``/``channel_mask`` (B, C): needed with ``channel_fusion="mean"`` only."""
        priors = priors or {}
        out = BackboneOutput(features=x)
        if self.channel_fusion == "mean":
            if channel_ids is None or channel_mask is None:
                raise ValueError("channel_fusion 'mean' needs channel_ids and channel_mask")
            h = self.stem(x, channel_ids, channel_mask)
        else:
            h = self.stem(x)
        skips = [h]
        for i, down in enumerate(self.down):
            h = down(h)
            if i + 1 in ENCODER_STAGE:
                h = self._fuse(ENCODER_STAGE[i + 1], h, priors, out)
            skips.append(h)
        for up, level in zip(self.up, (3, 2, 1, 0)):
            h = up(concat_skip(h, skips[level]))
            h = self._fuse(DECODER_STAGE[level], h, priors, out)
            out.decoder[DECODER_STAGE[level]] = h
        out.features = out.decoder.pop("dec4")
        return out
