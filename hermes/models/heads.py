"""Heads that turn posterior priors into predictions (reference ``hermes_utils.py``).

* :class:`PrototypeHead`: the task parts of the posteriors of several fusion stages are
  concatenated per task (multi-scale context), normalised and mapped by two MLPs to one
  prototype vector per task. A task's mask logits are the dot product of its prototype with the
  final decoder features at every voxel: no bias, no temperature, one independent sigmoid
  channel per task (no softmax across tasks, no background channel).
* :class:`ModalityHead`: the modality parts are concatenated, normalised, averaged over the
  modality tokens and classified into the M known modalities (an auxiliary task that makes the
  modality tokens carry imaging information).

Both return float32 even under bf16 autocast so that sigmoid, losses and thresholds downstream
see full precision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hermes.models.fusion import Mlp
from hermes.models.layers import NormName, make_norm


class PrototypeHead(nn.Module):
    """Concat(task posteriors) -> LN -> MLP(in, in, D) -> MLP(D, D, D) = prototypes (B, T, D)."""

    def __init__(self, in_dim: int, prototype_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(
            Mlp(in_dim, in_dim, prototype_dim), Mlp(prototype_dim, prototype_dim, prototype_dim)
        )
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):  # the reference initialisation
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def prototypes(self, task_tokens: list[Tensor]) -> Tensor:
        """task_tokens: per stage (B, T, C_stage) -> (B, T, D)."""
        return self.mlp(self.norm(torch.cat(task_tokens, dim=2)))

    def forward(self, task_tokens: list[Tensor], features: Tensor) -> Tensor:
        """features (B, D, *S) -> logits (B, T, *S), float32."""
        prototypes = self.prototypes(task_tokens)
        flat = features.flatten(2)  # (B, D, N); strided but BLAS-friendly when channels_last
        if not torch.is_autocast_enabled(features.device.type):
            flat = flat.to(prototypes.dtype)
        logits = torch.bmm(prototypes, flat)  # (B, T, N)
        return logits.float().unflatten(2, features.shape[2:])


class FeatureMlp(nn.Module):
    """Per-voxel MLP from the final decoder features to the prototype space
    (``model.feature_head: mlp``): 1x1 conv, norm, LeakyReLU, 1x1 conv.

    A task's logit is linear in the features it is dotted with. With the bare decoder output
    (8 channels in the tiny preset) every task of the catalog must be a direction in that 8-D
    space, shared with all the others, so tasks whose protocols contradict each other on the
    same voxels (a kidney tumour inside "kidney" for one dataset, outside it for another)
    compete for the same few directions. The MLP gives the prototypes a wider, non-linear
    feature space at full resolution for a few percent of a step's FLOPs.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: NormName) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 1, bias=False),
            make_norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(out_channels, out_channels, 1, bias=False),
        )

    def forward(self, features: Tensor) -> Tensor:
        norm = self.layers[1]
        # The ONNX export keeps the layer stack (the same function; ONNX Runtime has its own
        # kernels, and the folded form's batched GEMMs did not keep a dynamic batch there).
        exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
        if isinstance(norm, nn.InstanceNorm3d) and not norm.affine and features.dim() == 5 and not exporting:
            return self._folded_instance_norm(features, norm.eps)
        return self.layers(features)

    def _folded_instance_norm(self, features: Tensor, eps: float) -> Tensor:
        """The same function as ``self.layers`` with instance norm, computed as GEMMs on the
        channels-last voxels.

        Written by hand because it is faster: instance norm after a 1x1 conv is an affine map
        per sample, ``(W1 x - W1 mu) / sqrt(diag(W1 Cov W1^T) + eps)``, whose statistics come from
        the input's C x C second moments (one small GEMM). The layer stack instead converts the
        32-channel full-resolution maps between channels-last and NCDHW around the norm and the
        convolutions. Measured on this CPU (one thread, bf16 autocast, 2 x 8 x 48^3 -> 32 channels,
        forward + backward including the prototype product): 308 ms -> 175 ms; without any norm
        104 ms. Same parameters (old weights load unchanged); same values within float rounding
        (tests/test_recipe.py).
        """
        first = self.layers[0].weight.flatten(1).float()  # (D, C)
        second = self.layers[3].weight.flatten(1)  # (D, D)
        # (B, N, C): a view of channels-last features (no shape arithmetic, so that an ONNX
        # export keeps batch and volume dynamic).
        voxels = features.flatten(2).transpose(1, 2).float()
        mean = voxels.mean(1)  # (B, C)
        moments = torch.bmm(voxels.transpose(1, 2), voxels) / voxels.shape[1]  # (B, C, C)
        covariance = moments - mean.unsqueeze(2) * mean.unsqueeze(1)
        variance = torch.einsum("dc,bce,de->bd", first, covariance, first).clamp_min(0.0)  # of W1 x
        weight = first.unsqueeze(0) * torch.rsqrt(variance + eps).unsqueeze(2)  # (B, D, C)
        bias = -torch.bmm(weight, mean.unsqueeze(2)).transpose(1, 2)  # (B, 1, D)
        device = features.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else features.dtype
        hidden = torch.baddbmm(bias.to(dtype), voxels.to(dtype), weight.transpose(1, 2).to(dtype))
        hidden = nn.functional.leaky_relu(hidden, self.layers[2].negative_slope)
        out = torch.matmul(hidden, second.t().to(dtype))  # (B, N, D)
        return out.transpose(1, 2).unflatten(2, features.shape[2:])  # (B, D, *S), channels-last strides


class TaskLogitCalibration(nn.Module):
    """``logit = scale_t * (prototype_t . feature) + bias_t``: a learned scalar temperature and
    bias per task (``model.prototype_logit: affine``).

    The bare dot product has no offset, so a task's background level must come from its
    prototype's direction alone, and all tasks share one logit scale. The bias lets a small
    structure's background sit far below 0 independently of its shape features. Initialised
    to the identity (scale 1, bias 0), so a new model starts exactly as the paper's.
    Parameters are per task id; the last row serves the null (padded) slots.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(num_tasks + 1))
        self.bias = nn.Parameter(torch.zeros(num_tasks + 1))

    def forward(self, logits: Tensor, task_ids: Tensor) -> Tensor:
        """logits (B, T, *S) float32, task_ids (B, T) -> calibrated logits (B, T, *S)."""
        shape = (*task_ids.shape, *([1] * (logits.ndim - 2)))
        scale = self.log_scale.float().exp()[task_ids].view(shape)
        return logits * scale + self.bias.float()[task_ids].view(shape)


class ModalityHead(nn.Module):
    """Concat(modality posteriors) -> LN -> mean over tokens -> MLP(in, in, M) logits."""

    def __init__(self, in_dim: int, num_modalities: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, in_dim, num_modalities)

    def forward(self, modality_tokens: list[Tensor]) -> Tensor:
        """modality_tokens: per stage (B, L, C_stage) -> (B, M), float32."""
        pooled = self.norm(torch.cat(modality_tokens, dim=2)).mean(dim=1)
        return self.mlp(pooled).float()
