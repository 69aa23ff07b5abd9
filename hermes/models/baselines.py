"""Traditional per-dataset models behind the universal model's call signature.

A traditional model owns one sigmoid output channel per task of its dataset. It takes the same
``forward(image, task_ids, modality_id, task_mask)`` as :class:`HermesModel`: the global task
ids are mapped to its own channels and only the requested ones are returned, so training,
inference and evaluation code need no special case. Asking for a task the model was not
trained on is a :class:`ModelError`, not a silent wrong channel.

Networks: our ``resunet`` / ``medformer`` backbones + a 1x1x1 conv head (the paper's
single-dataset baselines), MONAI ``DynUNet`` (nnU-Net-like: kernels and strides derived from the
patch size) and MONAI ``SwinUNETR``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hermes.errors import ConfigError, ModelError
from hermes.models.backbone import DEEP_SUPERVISION_LEVELS
from hermes.models.channel_stem import channel_prompt, check_all_channels
from hermes.models.hermes import SegmentationOutput
from hermes.models.priors import check_ids, task_validity


class BackboneWithHead(nn.Module):
    """Backbone features -> 1x1x1 conv to one channel per own task (+ heads for deep supervision)."""

    def __init__(
        self, backbone: nn.Module, widths: Sequence[int], out_channels: int, deep_supervision: bool
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv3d(widths[0], out_channels, 1)
        levels = DEEP_SUPERVISION_LEVELS if deep_supervision else {}
        self.deep_heads = nn.ModuleDict(
            {name: nn.Conv3d(widths[level], out_channels, 1) for name, level in levels.items()}
        )

    def forward(
        self, image: Tensor, channel_ids: Tensor | None = None, channel_mask: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        out = self.backbone(image) if channel_ids is None else self.backbone(image, None, channel_ids, channel_mask)
        return self.head(out.features), [head(out.decoder[name]) for name, head in self.deep_heads.items()]


class MonaiAdapter(nn.Module):
    """A MONAI network returning (B, K, *S) logits; ``divisor`` is its required input size multiple."""

    def __init__(self, network: nn.Module, divisor: int = 1) -> None:
        super().__init__()
        self.network = network
        self.divisor = divisor

    def forward(self, image: Tensor) -> tuple[Tensor, list[Tensor]]:
        if any(size % self.divisor for size in image.shape[2:]):
            raise ValueError(
                f"{type(self.network).__name__} needs spatial sizes divisible by {self.divisor}, "
                f"got {tuple(image.shape[2:])}"
            )
        return self.network(image), []


def dynunet_kernels_strides(
    patch_size: Sequence[int], spacing: Sequence[float] | None = None
) -> tuple[list, list]:
    """nnU-Net's rule (MONAI tutorial): halve an axis while it is >= 8 voxels and not much coarser
    than the finest axis; 3x3x3 kernels except 1 along axes more than twice as coarse."""
    sizes = [int(s) for s in patch_size]
    spacings = [float(s) for s in (spacing or [1.0] * len(sizes))]
    kernels, strides = [], []
    while True:
        ratios = [sp / min(spacings) for sp in spacings]
        stride = [2 if ratio <= 2 and size >= 8 else 1 for ratio, size in zip(ratios, sizes)]
        kernel = [3 if ratio <= 2 else 1 for ratio in ratios]
        if all(s == 1 for s in stride) or len(strides) >= 5:
            break
        if any(size % s for size, s in zip(sizes, stride)):
            raise ConfigError(
                f"dynunet: patch_size {list(patch_size)} is not divisible by its down-sampling {stride}"
            )
        sizes = [size // s for size, s in zip(sizes, stride)]
        spacings = [sp * s for sp, s in zip(spacings, stride)]
        kernels.append(kernel)
        strides.append(stride)
    strides.insert(0, [1] * len(sizes))
    kernels.append([3] * len(sizes))
    return kernels, strides


class TraditionalModel(nn.Module):
    """One network per dataset, answering the universal model's call for its own tasks."""

    def __init__(
        self,
        network: nn.Module,
        task_ids_of_model: Sequence[int],
        num_tasks: int,
        num_modalities: int,
        channel_fusion: str = "none",
    ) -> None:
        super().__init__()
        own = [int(t) for t in task_ids_of_model]
        if not own or len(set(own)) != len(own) or min(own) < 0 or max(own) >= num_tasks:
            raise ModelError(f"task_ids_of_model must be distinct ids in 0..{num_tasks - 1}, got {own}")
        self.network = network
        self.task_ids_of_model = own
        self.num_tasks = num_tasks
        self.num_modalities = num_modalities
        self.channel_fusion = channel_fusion  # "mean": the network is a BackboneWithHead over a fusing ResUNet
        self.not_own = len(own)  # sentinel channel value for tasks of other datasets
        lookup = torch.full((num_tasks + 1,), self.not_own, dtype=torch.long)
        lookup[torch.tensor(own)] = torch.arange(len(own))
        self.register_buffer("channel_of_task", lookup, persistent=False)

    def forward(
        self,
        image: Tensor,
        task_ids: Tensor,
        modality_id: Tensor,
        task_mask: Tensor | None = None,
        channel_ids: Tensor | None = None,
        channel_mask: Tensor | None = None,
    ) -> SegmentationOutput:
        check_ids(task_ids, modality_id, self.num_tasks, self.num_modalities)
        valid = task_validity(task_ids, self.num_tasks, task_mask)
        channels = self.channel_of_task[task_ids]
        foreign = valid & (channels == self.not_own)
        if not torch.compiler.is_exporting() and bool(foreign.any()):
            raise ModelError(
                f"this per-dataset model predicts tasks {self.task_ids_of_model}, "
                f"not {sorted(set(task_ids[foreign].tolist()))}"
            )
        channels = torch.where(valid, channels, torch.zeros_like(channels))
        if self.channel_fusion == "mean":
            ids, mask = channel_prompt(image, modality_id, self.num_modalities, channel_ids, channel_mask)
            logits, deep = self.network(image, ids, mask)
        else:
            check_all_channels(channel_mask)
            logits, deep = self.network(image)
        rows = torch.arange(task_ids.shape[0], device=task_ids.device)[:, None]
        return SegmentationOutput(
            logits=logits[rows, channels].float(),
            modality_logits=None,
            deep_supervision=[d[rows, channels].float() for d in deep],
        )
