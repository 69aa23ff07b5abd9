"""Named model sizes, ``build_model`` from a :class:`ModelConfig`, and saving/loading a model.

A saved model is a folder that :mod:`hermes.bundle` alone reads and writes: the weights and a
:class:`~hermes.bundle.ModelBundle` whose ``network`` entry holds everything ``build_model``
needs (the model config, the number of tasks and modalities, a baseline's own task ids, the
patch size), so ``load_model`` rebuilds the network from the folder alone; the rest of the
bundle (task names, preprocessing, training info) is the caller's and is returned untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hermes.bundle import SPEC_FILE, ModelBundle, NetworkSpec, read_weights, weights_path
from hermes.config import ModelConfig
from hermes.errors import ConfigError, ModelError
from hermes.models.architectures import patch_constraints
from hermes.models.backbone import DEEP_SUPERVISION_LEVELS, ordered_stages, stage_widths
from hermes.models.baselines import BackboneWithHead, MonaiAdapter, TraditionalModel, dynunet_kernels_strides
from hermes.models.heads import FeatureMlp, ModalityHead, PrototypeHead, TaskLogitCalibration
from hermes.models.hermes import HermesModel
from hermes.models.medformer import MedFormer
from hermes.models.priors import ContextPriors
from hermes.models.resunet import ResUNet

# prototype width of model.feature_head "mlp" when model.prototype_dim is not set
MLP_FEATURE_DIM = 32


@dataclass(frozen=True)
class Preset:
    widths: tuple[int, ...]  # full, 1/2, 1/4, 1/8, 1/16 resolution
    blocks_per_stage: tuple[int, ...]  # ResUNet encoder stages; MedFormer uses [0] for its conv stages
    fusion_blocks: dict[str, int]  # Hermes-R fusion blocks per stage
    transformer_blocks: dict[str, int]  # MedFormer B-MHA blocks per stage (Hermes-M fusion)
    swin_feature_size: int  # SwinUNETR (multiple of 12)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        widths=(8, 16, 32, 64, 64),
        blocks_per_stage=(1, 1, 1, 1),
        fusion_blocks={"enc2": 1, "enc3": 1, "bottleneck": 1, "dec1": 1, "dec2": 1},
        transformer_blocks={"enc2": 1, "enc3": 1, "bottleneck": 1, "dec1": 1, "dec2": 1},
        swin_feature_size=12,
    ),
    "small": Preset(
        widths=(16, 32, 64, 128, 160),
        blocks_per_stage=(1, 1, 1, 1),
        fusion_blocks={"enc2": 1, "enc3": 1, "bottleneck": 2, "dec1": 1, "dec2": 1},
        transformer_blocks={"enc2": 1, "enc3": 2, "bottleneck": 4, "dec1": 2, "dec2": 1},
        swin_feature_size=24,
    ),
    # The paper's configuration (hermes_resunet_3d.yaml / hermes_medformer_3d.yaml).
    "base": Preset(
        widths=(32, 64, 128, 256, 320),
        blocks_per_stage=(2, 2, 2, 2),
        fusion_blocks={"enc2": 2, "enc3": 2, "bottleneck": 4, "dec1": 2, "dec2": 2},
        transformer_blocks={"enc2": 2, "enc3": 4, "bottleneck": 8, "dec1": 4, "dec2": 2},
        swin_feature_size=48,
    ),
}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _resolved(config: ModelConfig) -> tuple[Preset, list[int], list[int], list[list[int]]]:
    preset = PRESETS[config.preset]
    widths = list(config.widths or preset.widths)
    blocks = list(config.blocks_per_stage or preset.blocks_per_stage)
    downsample = [list(s) for s in (config.downsample or [[2, 2, 2]] * 4)]
    if len(widths) != 5 or min(widths) < 1:
        raise ConfigError(f"model.widths needs 5 positive widths (full .. 1/16 resolution), got {widths}")
    if len(blocks) != 4 or min(blocks) < 1:
        raise ConfigError(f"model.blocks_per_stage needs 4 counts >= 1, got {blocks}")
    if len(downsample) != 4 or any(len(s) != 3 or min(s) < 1 for s in downsample):
        raise ConfigError(f"model.downsample needs 4 per-axis strides like [2, 2, 2], got {downsample}")
    return preset, widths, blocks, downsample


def _fusion_blocks(config: ModelConfig, defaults: dict[str, int]) -> dict[str, int]:
    stages = ordered_stages(config.fusion_stages)
    given = dict(zip(config.fusion_stages, config.fusion_blocks)) if config.fusion_blocks else {}
    counts = {stage: given.get(stage, defaults[stage]) for stage in stages}
    if min(counts.values()) < 1:
        raise ConfigError(f"model.fusion_blocks must be >= 1 per fusion stage, got {counts}")
    return counts


def _build_hermes(config: ModelConfig, num_tasks: int, num_modalities: int) -> HermesModel:
    preset, widths, blocks, downsample = _resolved(config)
    head_dim = config.attention_head_dim
    if config.architecture == "hermes_resunet":
        fusion = _fusion_blocks(config, preset.fusion_blocks)
        backbone: nn.Module = ResUNet(
            config.in_channels, widths, blocks, downsample, config.norm, fusion, head_dim,
            channel_fusion=config.channel_fusion, num_modalities=num_modalities,
        )
    else:
        fusion = _fusion_blocks(config, preset.transformer_blocks)
        transformer = {**preset.transformer_blocks, **fusion}
        backbone = MedFormer(
            config.in_channels,
            widths,
            blocks[0],
            transformer,
            downsample,
            config.norm,
            list(fusion),
            head_dim,
        )
    stages = list(fusion)
    stage_width = stage_widths(widths, stages)
    priors = ContextPriors(
        stage_width, num_tasks, num_modalities, config.modality_tokens if config.modality_priors else 0
    )
    prototype_stages = stages if config.multiscale_prototypes else stages[-1:]
    prototype_in = sum(stage_width[s] for s in prototype_stages)
    projection: nn.Module | None
    if config.feature_head == "mlp":
        prototype_dim = config.prototype_dim or MLP_FEATURE_DIM
        projection = FeatureMlp(widths[0], prototype_dim, config.norm)
    else:
        prototype_dim = config.prototype_dim or widths[0]
        projection = None if prototype_dim == widths[0] else nn.Conv3d(widths[0], prototype_dim, 1, bias=False)
    deep = {}
    if config.deep_supervision:
        deep = {
            name: PrototypeHead(prototype_in, widths[level])
            for name, level in DEEP_SUPERVISION_LEVELS.items()
        }
    return HermesModel(
        backbone,
        priors,
        PrototypeHead(prototype_in, prototype_dim),
        prototype_stages,
        modality_head=ModalityHead(sum(stage_width.values()), num_modalities)
        if config.modality_priors
        else None,
        feature_projection=projection,
        deep_supervision_heads=deep,
        task_conditioned_features=config.task_conditioned_features,
        logit_calibration=TaskLogitCalibration(num_tasks) if config.prototype_logit == "affine" else None,
        channel_fusion=config.channel_fusion,
    )


def _build_network(
    config: ModelConfig, out_channels: int, patch_size: Sequence[int] | None, num_modalities: int
) -> nn.Module:
    preset, widths, blocks, downsample = _resolved(config)
    rules = patch_constraints(config)
    if config.deep_supervision and not rules.deep_supervision:
        raise ConfigError(f"model.deep_supervision is not supported for {config.architecture}")
    if config.architecture == "resunet":
        backbone: nn.Module = ResUNet(
            config.in_channels, widths, blocks, downsample, config.norm,
            channel_fusion=config.channel_fusion, num_modalities=num_modalities,
        )
        return BackboneWithHead(backbone, widths, out_channels, config.deep_supervision)
    if config.architecture == "medformer":
        backbone = MedFormer(
            config.in_channels, widths, blocks[0], preset.transformer_blocks, downsample, config.norm
        )
        return BackboneWithHead(backbone, widths, out_channels, config.deep_supervision)
    from monai.networks.nets import DynUNet, SwinUNETR

    if config.architecture == "dynunet":
        if patch_size is None:
            raise ConfigError(
                "model.architecture dynunet derives its kernels and strides from the patch size: give patch_size"
            )
        kernels, strides = dynunet_kernels_strides(patch_size)
        filters = [min(widths[0] * 2**i, widths[-1]) for i in range(len(strides))]
        norm = {"instance": "instance", "batch": "batch", "group": ("group", {"num_groups": 8})}[config.norm]
        network = DynUNet(
            3,
            config.in_channels,
            out_channels,
            kernels,
            strides,
            strides[1:],
            filters=filters,
            norm_name=norm,
        )
        return MonaiAdapter(network)
    if patch_size is not None and min(patch_size) < rules.min_size:
        # MONAI raises "Expected more than 1 spatial element" in the first step instead.
        raise ConfigError(
            f"model.architecture swinunetr needs patches of at least {rules.min_size} voxels per axis, "
            f"got {list(patch_size)} ({rules.why})"
        )
    network = SwinUNETR(
        in_channels=config.in_channels,
        out_channels=out_channels,
        feature_size=preset.swin_feature_size,
        spatial_dims=3,
    )
    return MonaiAdapter(network, divisor=32)


def build_model(
    model_config: ModelConfig,
    num_tasks: int,
    num_modalities: int,
    task_ids_of_model: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    *,
    task_ids: Sequence[int] | None = None,
) -> nn.Module:
    """Build a universal Hermes model or a traditional per-dataset baseline.

    ``task_ids_of_model`` (alias ``task_ids``): a baseline's own global task ids, one output
    channel each (ignored by Hermes, which selects any task through its priors). ``patch_size``
    is needed by ``dynunet``. The returned module carries ``build_spec`` (a
    :class:`~hermes.bundle.NetworkSpec`) for :func:`save_model`.
    """
    if task_ids is not None and task_ids_of_model is not None:
        raise TypeError("give task_ids_of_model or its alias task_ids, not both")
    own = task_ids_of_model if task_ids_of_model is not None else task_ids
    if num_tasks < 1 or num_modalities < 1:
        raise ModelError(
            f"a model needs num_tasks >= 1 and num_modalities >= 1, got {num_tasks}, {num_modalities}"
        )
    if model_config.architecture.startswith("hermes_"):
        model: nn.Module = _build_hermes(model_config, num_tasks, num_modalities)
    else:
        if not own:
            raise ModelError(f"architecture {model_config.architecture!r} is per-dataset: give its task ids")
        network = _build_network(model_config, len(own), patch_size, num_modalities)
        model = TraditionalModel(network, own, num_tasks, num_modalities, model_config.channel_fusion)
    model.build_spec = NetworkSpec(  # type: ignore[assignment]
        config=model_config,
        num_tasks=num_tasks,
        num_modalities=num_modalities,
        task_ids_of_model=list(own) if own is not None and not model_config.architecture.startswith("hermes_") else None,
        patch_size=list(patch_size) if patch_size is not None else None,
    )
    return model


def network_spec(model: nn.Module) -> NetworkSpec:
    """The network entry of a model made by :func:`build_model`."""
    build_spec = getattr(model, "build_spec", None)
    if not isinstance(build_spec, NetworkSpec):
        raise ModelError("save_model: this model was not made by build_model (no build_spec)")
    return build_spec


def save_model(
    directory: str | Path, model: nn.Module, bundle: ModelBundle | None = None, catalog_yaml: str | None = None
) -> Path:
    """Save ``model`` with ``bundle`` (default: a bundle with only the network entry) through
    :meth:`ModelBundle.save`. The bundle's network entry must be the model's."""
    network = network_spec(model)
    if bundle is None:
        bundle = ModelBundle(network=network)
    elif bundle.network.model_dump(mode="json") != network.model_dump(mode="json"):
        raise ModelError("save_model: the bundle's network entry is not this model's (use model.build_spec)")
    return bundle.save(directory, model.state_dict(), catalog_yaml)


def build_saved_network(bundle: ModelBundle) -> nn.Module:
    """The network of a bundle with fresh weights."""
    entry = bundle.network
    return build_model(entry.config, entry.num_tasks, entry.num_modalities, entry.task_ids_of_model, entry.patch_size)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelBundle]:
    """Rebuild the model from the folder's bundle and load its weights (eval mode)."""
    directory = Path(directory)
    bundle = ModelBundle.load(directory)
    model = build_saved_network(bundle)
    state = read_weights(directory)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ModelError(
            f"{weights_path(directory)} does not match {SPEC_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), bundle
