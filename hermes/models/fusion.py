"""Prior fusion (Hermes-R): a two-way cross-attention transformer between priors and voxels.

Each :class:`FusionBlock` does exactly the reference ``PriorAttentionBlock`` (pre-norm, residual,
no self-attention among priors, no positional encoding, no dropout):

1. priors <- priors + CrossAttn(q=LN(priors), kv=LN(voxels))   the priors read the image;
2. priors <- priors + MLP(LN(priors))                          ratio 4;
3. voxels <- voxels + CrossAttn(q=LN(voxels), kv=LN(priors))   the image reads the priors;
4. voxels <- voxels + MLP(LN(voxels))                          per voxel, ratio 4.

Step 3 masks padded task slots out of the keys, so padding never changes real outputs. Because
no prior attends to another prior, a task token's posterior depends only on the image features.

Efficiency: at 1/4 resolution there are thousands of voxel queries and a few dozen priors, so
the attention matrices are small (N x P); the cost is in the per-voxel linear layers. Attention
uses ``scaled_dot_product_attention`` with a boolean (B, 1, 1, P) key mask (measured on this
2-core CPU, 2x4096 voxels x 33 priors, fwd+bwd: SDPA 6.9 ms vs 11.6 ms for an explicit softmax in
fp32). Voxel tokens are a free view of a channels_last_3d feature map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hermes.models.priors import PriorTokens


def attention_heads(width: int, head_dim: int) -> tuple[int, int]:
    """(heads, dim per head): heads = width // head_dim as in the paper (dim_head 32).

    Widths below ``head_dim`` (tiny presets) use one head of the full width instead of the
    reference's zero heads.
    """
    if width >= head_dim:
        return width // head_dim, head_dim
    return 1, width


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (the reference ``Mlp``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CrossAttention(nn.Module):
    """Multi-head attention of ``queries`` over ``context`` (q/kv without bias, as the reference)."""

    def __init__(self, width: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = attention_heads(width, head_dim)
        inner = self.heads * self.head_dim
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width)

    def forward(self, queries: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """queries (B, Nq, C), context (B, Nk, C), key_mask (B, Nk) bool (True = may be read)."""
        b, nq, _ = queries.shape
        nk = context.shape[1]
        q = self.to_q(queries).view(b, nq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(context).view(b, nk, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, nq, self.heads * self.head_dim))


class FusionBlock(nn.Module):
    """One two-way block (reference ``PriorAttentionBlock``)."""

    def __init__(self, width: int, head_dim: int = 32, mlp_ratio: int = 4) -> None:
        super().__init__()
        # LayerNorm eps as the reference: 1e-5 before attention (DualPreNorm), 1e-4 before MLPs.
        self.prior_norm = nn.LayerNorm(width)
        self.prior_context_norm = nn.LayerNorm(width)
        self.prior_attn = CrossAttention(width, head_dim)
        self.prior_mlp_norm = nn.LayerNorm(width, eps=1e-4)
        self.prior_mlp = Mlp(width, width * mlp_ratio, width)
        self.voxel_norm = nn.LayerNorm(width)
        self.voxel_context_norm = nn.LayerNorm(width)
        self.voxel_attn = CrossAttention(width, head_dim)
        self.voxel_mlp_norm = nn.LayerNorm(width, eps=1e-4)
        self.voxel_mlp = Mlp(width, width * mlp_ratio, width)

    def forward(self, voxels: Tensor, priors: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """voxels (B, N, C), priors (B, P, C), key_mask (B, P) -> updated (voxels, priors)."""
        priors = priors + self.prior_attn(self.prior_norm(priors), self.prior_context_norm(voxels))
        priors = priors + self.prior_mlp(self.prior_mlp_norm(priors))
        voxels = voxels + self.voxel_attn(self.voxel_norm(voxels), self.voxel_context_norm(priors), key_mask)
        voxels = voxels + self.voxel_mlp(self.voxel_mlp_norm(voxels))
        return voxels, priors


class PriorFusion(nn.Module):
    """A fusion stage: N :class:`FusionBlock` on a (B, C, X, Y, Z) feature map and its priors."""

    def __init__(self, width: int, num_blocks: int, head_dim: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([FusionBlock(width, head_dim) for _ in range(num_blocks)])

    def forward(self, feature: Tensor, priors: PriorTokens) -> tuple[Tensor, Tensor]:
        """Return the fused feature map (same shape and memory format) and the posterior priors."""
        spatial = feature.shape[2:]
        channels_last = feature.is_contiguous(memory_format=torch.channels_last_3d)
        voxels = feature.flatten(2).transpose(1, 2).contiguous()  # (B, N, C): free when channels_last
        tokens = priors.tokens
        for block in self.blocks:
            voxels, tokens = block(voxels, tokens, priors.key_mask)
        out = voxels.transpose(1, 2).unflatten(2, spatial)  # channels_last strides
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        return out.contiguous(memory_format=fmt), tokens
