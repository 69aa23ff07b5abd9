"""MedFormer-style hybrid backbone (CBIM ``MedFormer``), the backbone of Hermes-M.

* Full and 1/2 resolution: convolutions only (stem conv3 + BasicBlock; space-to-depth patch
  merging then BasicBlocks; on the way up trilinear up-sampling, concat, BasicBlocks).
* 1/4 to 1/16 (stages enc2, enc3, bottleneck, dec1, dec2): each stage summarises its feature map
  into 64 **semantic map tokens** (learned soft assignments, map_size 4x4x4) and runs
  bidirectional attention blocks (**B-MHA**): one logit matrix between voxel queries and
  token queries, softmax over tokens updates the voxels, softmax over voxels updates the
  tokens. Voxel projections are depthwise-separable convolutions, token projections linear;
  voxels get an MBConv (SE) feed-forward, tokens only a residual update.
* After the encoder, the three encoder maps are fused by a small transformer
  (``SemanticMapFusion``) and handed to the decoder stages of matching resolution.

For **Hermes-M** the selected prior tokens are appended to a stage's map tokens and carried
through its B-MHA blocks (padded task tokens masked out of the voxels' keys); the priors are
removed again before map fusion, and each decoder stage starts from its own pool. The stage's
posterior priors are its prior tokens after its last block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hermes.models.backbone import BackboneOutput
from hermes.models.fusion import Mlp, attention_heads
from hermes.models.layers import (
    BasicBlock,
    DepthwiseConv3d,
    NormName,
    PreActConv,
    blocks,
    concat_skip,
    make_norm,
)
from hermes.models.priors import PriorTokens

MAP_TOKENS = 64  # semantic map of 4 x 4 x 4 tokens, as the reference
TRANSFORMER_STAGES = ("enc2", "enc3", "bottleneck", "dec1", "dec2")


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, h*d) -> (B, h, N, d)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, h, N, d) -> (B, N, h*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class DepthwiseSeparableConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3) -> None:
        super().__init__(
            DepthwiseConv3d(in_ch, in_ch, kernel, padding=kernel // 2, groups=in_ch, bias=False),
            nn.Conv3d(in_ch, out_ch, 1, bias=False),
        )


class MBConv(nn.Module):
    """Pre-activation inverted bottleneck with squeeze-excitation (expansion 4), residual."""

    def __init__(self, channels: int, norm: NormName, expansion: int = 4, se_ratio: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = PreActConv(channels, hidden, (1, 1, 1), norm)
        self.depthwise = PreActConv(hidden, hidden, (3, 3, 3), norm, groups=hidden)
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(hidden, hidden // se_ratio, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden // se_ratio, hidden, 1),
            nn.Sigmoid(),
        )
        self.project = PreActConv(hidden, channels, (1, 1, 1), norm, act=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.depthwise(self.expand(x))
        return x + self.project(h * self.se(h))


class PatchMerging(nn.Module):
    """Space-to-depth down-sampling (per-axis stride), norm, depthwise-separable projection."""

    def __init__(self, in_ch: int, out_ch: int, stride: Sequence[int], norm: NormName) -> None:
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        merged = in_ch * self.stride[0] * self.stride[1] * self.stride[2]
        self.norm = make_norm(norm, merged)
        self.reduce = DepthwiseSeparableConv(merged, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *size = x.shape
        sx, sy, sz = self.stride
        if any(n % s for n, s in zip(size, self.stride)):
            raise ValueError(
                f"MedFormer: spatial size {size} not divisible by the down-sampling {self.stride}"
            )
        channels_last = x.is_contiguous(memory_format=torch.channels_last_3d)
        x = x.reshape(b, c, size[0] // sx, sx, size[1] // sy, sy, size[2] // sz, sz)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(
            b, c * sx * sy * sz, size[0] // sx, size[1] // sy, size[2] // sz
        )
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.reduce(self.norm(x))


class BidirectionalAttention(nn.Module):
    """B-MHA: one logit matrix q_voxel . q_token; softmax over tokens -> voxels, over voxels -> tokens."""

    def __init__(
        self, feat_dim: int, map_dim: int, out_dim: int, head_dim: int, map_out: bool = True
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = attention_heads(out_dim, head_dim)
        inner = self.heads * self.head_dim
        self.feat_qv = DepthwiseSeparableConv(feat_dim, 2 * inner)
        self.feat_out = DepthwiseSeparableConv(inner, out_dim)
        self.map_qv = nn.Linear(map_dim, 2 * inner, bias=False)
        # The last block of the last stage needs no token projection (reference `no_map_out`).
        self.map_out: nn.Module = (
            nn.Linear(inner, map_dim, bias=False) if map_out or inner != map_dim else nn.Identity()
        )

    def forward(self, feat: Tensor, tokens: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        spatial = feat.shape[2:]
        feat_q, feat_v = self.feat_qv(feat).flatten(2).transpose(1, 2).chunk(2, dim=2)  # (B, N, inner)
        map_q, map_v = self.map_qv(tokens).chunk(2, dim=2)  # (B, P, inner)
        feat_q, feat_v, map_q, map_v = (split_heads(t, self.heads) for t in (feat_q, feat_v, map_q, map_v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        # Voxels read the tokens (softmax over tokens, padded priors masked) ...
        feat_out = merge_heads(F.scaled_dot_product_attention(feat_q, map_q, map_v, attn_mask=mask))
        # ... and tokens read the voxels with the same logits transposed (softmax over voxels).
        map_out = merge_heads(F.scaled_dot_product_attention(map_q, feat_q, feat_v))
        feat_out = feat_out.transpose(1, 2).unflatten(2, spatial)
        if feat.is_contiguous(memory_format=torch.channels_last_3d):
            feat_out = feat_out.contiguous(memory_format=torch.channels_last_3d)
        return self.feat_out(feat_out), self.map_out(map_out)


class BMHABlock(nn.Module):
    def __init__(
        self, feat_dim: int, map_dim: int, out_dim: int, head_dim: int, norm: NormName, map_out: bool = True
    ) -> None:
        super().__init__()
        self.feat_norm = make_norm(norm, feat_dim)
        self.map_norm = nn.LayerNorm(map_dim)
        self.attn = BidirectionalAttention(feat_dim, map_dim, out_dim, head_dim, map_out)
        self.shortcut: nn.Module = (
            nn.Identity() if feat_dim == out_dim else PreActConv(feat_dim, out_dim, (1, 1, 1), norm)
        )
        self.feedforward = MBConv(out_dim, norm)

    def forward(self, x: Tensor, tokens: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        feat_out, map_out = self.attn(self.feat_norm(x), self.map_norm(tokens), key_mask)
        return self.feedforward(feat_out + self.shortcut(x)), tokens + map_out


class SemanticMapGeneration(nn.Module):
    """64 tokens = feature map pooled with 64 learned soft (softmax over voxels) weight maps."""

    def __init__(self, feat_dim: int, map_dim: int) -> None:
        super().__init__()
        self.base_proj = nn.Conv3d(feat_dim, map_dim, 3, padding=1, bias=False)
        self.semantic_proj = nn.Conv3d(feat_dim, MAP_TOKENS, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.base_proj(x).flatten(2)  # (B, C, N)
        weights = self.semantic_proj(x).flatten(2).float().softmax(dim=2).to(feat.dtype)  # (B, 64, N)
        return torch.bmm(weights, feat.transpose(1, 2))  # (B, 64, C)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=2))
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class SemanticMapFusion(nn.Module):
    """Project the encoder maps to one width, run a 2-layer transformer over all of them, project back."""

    def __init__(self, dims: Sequence[int], dim: int, head_dim: int, depth: int = 2) -> None:
        super().__init__()
        heads, _ = attention_heads(dim, head_dim)
        self.in_proj = nn.ModuleList(nn.Linear(d, dim, bias=False) for d in dims)
        self.out_proj = nn.ModuleList(nn.Linear(dim, d, bias=False) for d in dims)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    nn.LayerNorm(dim, eps=1e-4),
                    SelfAttention(dim, heads),
                    nn.LayerNorm(dim, eps=1e-4),
                    Mlp(dim, dim, dim),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        x = torch.cat([proj(m) for proj, m in zip(self.in_proj, maps)], dim=1)
        for norm1, attn, norm2, mlp in self.layers:
            x = x + attn(norm1(x))
            x = x + mlp(norm2(x))
        return [proj(part) for proj, part in zip(self.out_proj, x.chunk(len(maps), dim=1))]


class TokenStage(nn.Module):
    """B-MHA blocks over a feature map and its map tokens (+ the stage's priors when given)."""

    def __init__(
        self,
        feat_dim: int,
        width: int,
        num_blocks: int,
        head_dim: int,
        norm: NormName,
        last_map_out: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            BMHABlock(
                feat_dim if i == 0 else width,
                width,
                width,
                head_dim,
                norm,
                last_map_out or i < num_blocks - 1,
            )
            for i in range(num_blocks)
        )

    def forward(
        self, x: Tensor, map_tokens: Tensor, priors: PriorTokens | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        tokens, key_mask = map_tokens, None
        if priors is not None:
            # Token streams are tiny: keep them in the wider dtype (fp32 priors under bf16 autocast).
            dtype = torch.promote_types(map_tokens.dtype, priors.tokens.dtype)
            tokens = torch.cat([map_tokens.to(dtype), priors.tokens.to(dtype)], dim=1)
            always = torch.ones(map_tokens.shape[:2], dtype=torch.bool, device=map_tokens.device)
            key_mask = torch.cat([always, priors.key_mask], dim=1)
        for block in self.blocks:
            x, tokens = block(x, tokens, key_mask)
        posterior = tokens[:, MAP_TOKENS:] if priors is not None else None
        return x, tokens[:, :MAP_TOKENS], posterior


class MedFormer(nn.Module):
    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        conv_blocks: int,
        transformer_blocks: Mapping[str, int],
        downsample: Sequence[Sequence[int]],
        norm: NormName = "instance",
        fusion_stages: Sequence[str] = (),
        head_dim: int = 32,
    ) -> None:
        super().__init__()
        if len(widths) != 5 or len(downsample) != 4:
            raise ValueError("MedFormer needs 5 widths and 4 downsample strides")
        missing = [s for s in TRANSFORMER_STAGES if transformer_blocks.get(s, 0) < 1]
        if missing:
            raise ValueError(f"MedFormer needs at least one B-MHA block at {missing}")
        self.widths = w = list(widths)
        self.fusion_stages = set(fusion_stages)
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, w[0], 3, padding=1, bias=False), BasicBlock(w[0], w[0], norm)
        )
        self.merge = nn.ModuleList(PatchMerging(w[i], w[i + 1], downsample[i], norm) for i in range(4))
        self.enc1 = blocks(w[1], w[1], conv_blocks, norm)
        self.map_gen = nn.ModuleDict(
            {
                s: SemanticMapGeneration(w[level], w[level])
                for s, level in (("enc2", 2), ("enc3", 3), ("bottleneck", 4))
            }
        )
        self.enc = nn.ModuleDict(
            {
                s: TokenStage(w[level], w[level], transformer_blocks[s], head_dim, norm)
                for s, level in (("enc2", 2), ("enc3", 3), ("bottleneck", 4))
            }
        )
        self.map_fusion = SemanticMapFusion(w[2:5], w[4], head_dim)
        self.map_reduce = nn.ModuleDict(
            {
                "dec1": nn.Linear(w[4] + w[3], w[3], bias=False),
                "dec2": nn.Linear(w[3] + w[2], w[2], bias=False),
            }
        )
        self.dec = nn.ModuleDict(
            {
                "dec1": TokenStage(w[4] + w[3], w[3], transformer_blocks["dec1"], head_dim, norm),
                "dec2": TokenStage(
                    w[3] + w[2], w[2], transformer_blocks["dec2"], head_dim, norm, last_map_out=False
                ),
            }
        )
        self.dec3 = blocks(w[2] + w[1], w[1], conv_blocks, norm)
        self.dec4 = blocks(w[1] + w[0], w[0], conv_blocks, norm)

    def _stage_priors(self, stage: str, priors: Mapping[str, PriorTokens]) -> PriorTokens | None:
        if stage not in self.fusion_stages:
            return None
        if stage not in priors:
            raise ValueError(f"fusion stage {stage!r} needs prior tokens")
        return priors[stage]

    def forward(self, x: Tensor, priors: Mapping[str, PriorTokens] | None = None) -> BackboneOutput:
        priors = priors or {}
        out = BackboneOutput(features=x)
        x0 = self.stem(x)
        x1 = self.enc1(self.merge[0](x0))
        h, skips, maps = x1, {}, []
        for i, stage in enumerate(("enc2", "enc3", "bottleneck")):
            h = self.merge[i + 1](h)
            h, map_tokens, post = self.enc[stage](
                h, self.map_gen[stage](h), self._stage_priors(stage, priors)
            )
            skips[stage], maps = h, [*maps, map_tokens]
            if post is not None:
                out.posteriors[stage] = post
        fused = self.map_fusion(maps)  # priors were stripped: maps only
        map_tokens = fused[2]
        for stage, skip, enc_map in (("dec1", skips["enc3"], fused[1]), ("dec2", skips["enc2"], fused[0])):
            h = concat_skip(h, skip)
            map_tokens = self.map_reduce[stage](torch.cat([map_tokens, enc_map.to(map_tokens.dtype)], dim=2))
            h, map_tokens, post = self.dec[stage](h, map_tokens, self._stage_priors(stage, priors))
            out.decoder[stage] = h
            if post is not None:
                out.posteriors[stage] = post
        out.decoder["dec3"] = h = self.dec3(concat_skip(h, x1))
        out.features = self.dec4(concat_skip(h, x0))
        return out
