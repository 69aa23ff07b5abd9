"""The universal Hermes model: one network, many datasets, tasks selected by context priors.

    image, task_ids (B, T), modality_id (B,)
      -> ContextPriors: per fusion stage, the T task tokens (NULL on padded slots) + L modality tokens
      -> backbone with prior fusion at enc2 / enc3 / bottleneck / dec1 / dec2
         (Hermes-R: two-way cross-attention blocks; Hermes-M: priors ride along MedFormer's map tokens)
      -> posterior task tokens of all stages -> PrototypeHead -> one prototype per requested task
         -> logits = prototype . final features  (B, T, *S), one sigmoid mask per task
      -> posterior modality tokens -> ModalityHead -> (B, M)

Only the requested tasks' tokens are selected, so the cost grows with the requested T, not with
the catalog. Padded slots (task_mask False, or the NULL id) are masked out of every attention
that the image features or the real tokens read, so they change nothing in the real outputs;
their own logits are meaningless and must be ignored through ``task_mask``.

**Prompt vs output.** By default (the paper's design) the image features read the prompted task
tokens, so the task list is *context*: the paper always prompts with one dataset's full task
list, and prompting with fewer tasks changes the features. A caller that wants only some of the
prompted tasks passes ``output_tasks`` (positions in the prompt): the backbone still reads the
full prompt, but prototypes and the voxel-wise dot product (the part whose cost grows with T at
full resolution) are computed for the requested tasks only, and their logits equal the full
request's bit for bit. With ``task_conditioned_features=False`` the features read only the
modality tokens, so even the prompt can be any subset with identical logits (decided in
docs/architecture.md, "Task prompts").

**Channels.** With ``channel_fusion="mean"`` the backbone's stem reads each channel on its own
(hermes/models/channel_stem.py); ``channel_ids`` (the modality of each channel) and
``channel_mask`` (the channels present) then say what the image's channels are. A
single-channel image needs neither (its channel has the sample's modality). With ``"none"``
they are not read, except that a channel masked as missing is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hermes.models.channel_stem import channel_prompt, check_all_channels
from hermes.models.heads import ModalityHead, PrototypeHead, TaskLogitCalibration
from hermes.models.priors import ContextPriors, PriorTokens, check_ids, task_validity, tracing


@dataclass
class SegmentationOutput:
    logits: Tensor  # (B, T_req, *S) float32, one sigmoid channel per requested task
    modality_logits: Tensor | None = None  # (B, M) or None
    deep_supervision: list[Tensor] = field(default_factory=list)  # (B, T_req, *lower), high-res first


class HermesModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        priors: ContextPriors,
        prototype_head: PrototypeHead,
        prototype_stages: Sequence[str],
        modality_head: ModalityHead | None = None,
        feature_projection: nn.Module | None = None,
        deep_supervision_heads: dict[str, PrototypeHead] | None = None,
        task_conditioned_features: bool = True,
        logit_calibration: TaskLogitCalibration | None = None,
        channel_fusion: str = "none",
    ) -> None:
        super().__init__()
        self.priors = priors
        self.backbone = backbone
        self.prototype_head = prototype_head  # registered before the deep-supervision heads
        self.prototype_stages = list(prototype_stages)
        self.modality_head = modality_head
        self.feature_projection = feature_projection
        self.deep_supervision_heads = nn.ModuleDict(deep_supervision_heads or {})
        self.task_conditioned_features = task_conditioned_features
        self.logit_calibration = logit_calibration
        self.channel_fusion = channel_fusion

    @property
    def num_tasks(self) -> int:
        return self.priors.num_tasks

    @property
    def num_modalities(self) -> int:
        return self.priors.num_modalities

    def _select_priors(self, task_ids: Tensor, valid: Tensor, modality_id: Tensor) -> dict[str, PriorTokens]:
        priors = self.priors(task_ids, valid, modality_id)
        if not self.task_conditioned_features:
            num_tasks = task_ids.shape[1]
            for tokens in priors.values():
                tokens.key_mask = tokens.key_mask.clone()
                tokens.key_mask[:, :num_tasks] = False  # features read the modality tokens only
        return priors

    def forward(
        self,
        image: Tensor,
        task_ids: Tensor,
        modality_id: Tensor,
        task_mask: Tensor | None = None,
        output_tasks: Sequence[int] | None = None,
        channel_ids: Tensor | None = None,
        channel_mask: Tensor | None = None,
    ) -> SegmentationOutput:
        check_ids(task_ids, modality_id, self.num_tasks, self.num_modalities)
        valid = task_validity(task_ids, self.priors.null_task_id, task_mask)
        if not tracing() and not bool(valid.any(dim=1).all()):
            raise ValueError("every sample needs at least one real (unpadded) task")
        num_tasks = task_ids.shape[1]
        priors = self._select_priors(task_ids, valid, modality_id)
        if self.channel_fusion == "mean":
            ids, mask = channel_prompt(image, modality_id, self.num_modalities, channel_ids, channel_mask)
            out = self.backbone(image, priors, ids, mask)
        else:
            check_all_channels(channel_mask)
            out = self.backbone(image, priors)
        task_tokens = [out.posteriors[stage][:, :num_tasks] for stage in self.prototype_stages]
        output_ids = task_ids
        if output_tasks is not None:
            if not output_tasks or min(output_tasks) < 0 or max(output_tasks) >= num_tasks:
                raise ValueError(f"output_tasks {list(output_tasks)} must be positions in a prompt of {num_tasks} tasks")
            index = torch.as_tensor(list(output_tasks), device=image.device)
            task_tokens = [tokens.index_select(1, index) for tokens in task_tokens]
            output_ids = task_ids.index_select(1, index)
        features = out.features if self.feature_projection is None else self.feature_projection(out.features)
        logits = self._calibrate(self.prototype_head(task_tokens, features), output_ids)
        modality_logits = None
        if self.modality_head is not None:
            modality_logits = self.modality_head([post[:, num_tasks:] for post in out.posteriors.values()])
        deep = [
            self._calibrate(head(task_tokens, out.decoder[name]), output_ids)
            for name, head in self.deep_supervision_heads.items()
        ]
        return SegmentationOutput(logits, modality_logits, deep)

    def _calibrate(self, logits: Tensor, task_ids: Tensor) -> Tensor:
        return logits if self.logit_calibration is None else self.logit_calibration(logits, task_ids)
