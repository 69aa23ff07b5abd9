"""Each architecture's patch constraints come from hermes/models/architectures.py (plan.py asks)."""

from __future__ import annotations

import typing

import pytest

from hermes.config import Architecture, ModelConfig
from hermes.models.architectures import patch_constraints


@pytest.mark.parametrize("arch", typing.get_args(Architecture))
def test_every_architecture_accepts_a_64_cube(arch: str) -> None:
    assert patch_constraints(ModelConfig(architecture=arch)).problems([64, 64, 64]) == []


def test_the_constraints_name_the_problem() -> None:
    resunet = patch_constraints(ModelConfig(architecture="resunet"))
    assert resunet.multiple == (16, 16, 16)
    assert resunet.problems([40, 32, 32]) == ["40 (axis 0) is not a multiple of 16"]
    assert resunet.problems([16, 16, 16]) == []  # a 1-voxel bottleneck is fine without priors
    hermes = patch_constraints(ModelConfig(architecture="hermes_resunet"))
    assert "bottleneck of [1, 1, 1]" in hermes.problems([16, 16, 16])[0]
    swin = patch_constraints(ModelConfig(architecture="swinunetr"))
    assert "at least 64" in swin.problems([32, 32, 32])[0] and not swin.deep_supervision
    anisotropic = patch_constraints(ModelConfig(architecture="resunet", downsample=[[2, 2, 1]] * 4))
    assert anisotropic.multiple == (16, 16, 1)
    assert patch_constraints(ModelConfig(architecture="dynunet")).problems([37, 41, 29]) == []
