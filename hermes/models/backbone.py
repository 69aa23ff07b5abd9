"""What every backbone returns, and the names of the points where priors are fused.

Levels are resolutions: level 0 is full size, level k is down-sampled k times. The paper fuses
priors at five named points, all at 1/4 resolution or coarser:

    enc2 (level 2, 1/4)  enc3 (level 3, 1/8)  bottleneck (level 4, 1/16)
    dec1 (decoder output at level 3)          dec2 (decoder output at level 2)
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from hermes.config import FusionStage

# the stage names, in data-flow order, are the config's (one list: hermes/config.py FusionStage)
FUSION_STAGES: tuple[str, ...] = typing.get_args(FusionStage)
STAGE_LEVEL: dict[str, int] = {"enc2": 2, "enc3": 3, "bottleneck": 4, "dec1": 3, "dec2": 2}
# Decoder outputs offered for deep supervision, highest resolution first.
DEEP_SUPERVISION_LEVELS: dict[str, int] = {"dec3": 1, "dec2": 2}


def stage_widths(widths: Sequence[int], stages: Sequence[str] = FUSION_STAGES) -> dict[str, int]:
    """Channel width at each named fusion point for a 5-level U-shaped network."""
    return {stage: widths[STAGE_LEVEL[stage]] for stage in stages}


def ordered_stages(stages: Sequence[str]) -> list[str]:
    """The given stages in forward (data-flow) order."""
    return [stage for stage in FUSION_STAGES if stage in stages]


@dataclass
class BackboneOutput:
    features: Tensor  # (B, widths[0], *S): final full-resolution decoder features
    decoder: dict[str, Tensor] = field(default_factory=dict)  # "dec1".."dec3" outputs
    posteriors: dict[str, Tensor] = field(default_factory=dict)  # stage -> (B, P, C) tokens
