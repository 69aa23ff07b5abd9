"""What each architecture demands of its input patch: asked by training's plan and by the
model builder, so adding an architecture means describing it here, not editing the trainer.

A patch must be a multiple of the architecture's total down-sampling per axis (else the skip
connections do not line up); some architectures need more (SwinUNETR's five 2x reductions need
64 voxels to keep a trainable bottleneck; Hermes fuses priors at the bottleneck, which needs at
least 2 voxels per axis for its attention to see more than one token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hermes.config import ModelConfig

DEFAULT_DOWNSAMPLE = [[2, 2, 2]] * 4


@dataclass(frozen=True)
class PatchConstraints:
    multiple: tuple[int, int, int]  # the patch must be a multiple of this per axis
    min_size: int = 1  # voxels per axis, at least
    min_bottleneck: int = 1  # voxels per axis left after all down-sampling
    deep_supervision: bool = True  # whether the architecture offers deep-supervision outputs
    why: str = ""  # the reason, for error messages

    def problems(self, patch: list[int] | tuple[int, ...]) -> list[str]:
        """Human-readable reasons why ``patch`` does not fit (empty: it fits)."""
        found = [f"{p} (axis {a}) is not a multiple of {m}" for a, (p, m) in enumerate(zip(patch, self.multiple)) if p % m]
        if min(patch) < self.min_size:
            found.append(f"needs at least {self.min_size} voxels per axis, got {list(patch)}")
        low = [p // m for p, m in zip(patch, self.multiple)]
        if not found and min(low) < self.min_bottleneck:
            found.append(f"leaves a bottleneck of {low} voxels; use at least {self.min_bottleneck} per axis")
        return found


def patch_constraints(model: ModelConfig) -> PatchConstraints:
    arch = model.architecture
    if arch == "swinunetr":
        return PatchConstraints((32, 32, 32), min_size=64, deep_supervision=False,
                                why="five 2x reductions; below 64 the 1-voxel bottleneck cannot use instance norm")
    if arch == "dynunet":
        return PatchConstraints((1, 1, 1), deep_supervision=False, why="derives its strides from the patch itself")
    strides = model.downsample or DEFAULT_DOWNSAMPLE
    multiple = tuple(math.prod(s[axis] for s in strides) for axis in range(3))
    if arch.startswith("hermes_"):
        return PatchConstraints(multiple, min_bottleneck=2, why=f"strides {strides}; priors fuse at the bottleneck")  # type: ignore[arg-type]
    return PatchConstraints(multiple, why=f"strides {strides}")  # type: ignore[arg-type]
