"""Every configurable value of Hermes, with its default, in one place.

YAML files are validated into these typed objects (pydantic, ``extra="forbid"``): an unknown or
misspelt key is an error naming the key and the file, raised before any work starts. Stages
receive the typed section they need (``TrainConfig.data``, ``TrainConfig.model``...), never raw
dicts.

Presets (``hermes/configs/*.yaml``) only override values; they never introduce defaults of
their own, so reading this file tells you what an unset key means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hermes.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class Strict(BaseModel):
    """Base of all config sections: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Preprocessing (used by `hermes prepare`, stored in the cache and in every saved model so that
# `hermes predict` applies exactly the training-time preprocessing).
# --------------------------------------------------------------------------------------------
class PreprocessConfig(Strict):
    # Target voxel spacing in mm (x, y, z after reorientation to RAS). None: per dataset, the
    # median spacing of its training cases (nnU-Net's choice), made isotropic when the
    # anisotropy ratio is below `isotropic_below_ratio`.
    target_spacing: list[float] | None = None
    isotropic_below_ratio: float = 3.0
    # CT: clip to this HU window, then z-score with the dataset's foreground statistics.
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    # MR/other: clip to these per-volume percentiles, then per-volume z-score.
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    mr_zscore_in_body: bool = False
    # PET: divide by this SUV-like scale (per-volume percentile of the body) then log1p.
    pet_percentile: float = 99.5
    # Crop to the non-zero body region (never to the labels: that would leak the answer).
    crop_to_body: bool = True
    body_threshold_ct: float = -500.0
    # What to do with a case that fails validation: "error" stops, "skip" logs and goes on.
    on_bad_case: Literal["error", "skip"] = "error"
    workers: int = 2
    image_dtype: Literal["float32", "float16"] = "float32"

    @field_validator("target_spacing")
    @classmethod
    def _three_positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 3 or min(value) <= 0):
            raise ValueError("target_spacing needs three positive numbers (mm)")
        return value


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
Architecture = Literal[
    "hermes_resunet",  # Hermes-R: residual U-Net + context priors
    "hermes_medformer",  # Hermes-M: MedFormer-style hybrid + context priors
    "resunet",  # traditional baseline: same backbone, one output channel per own class
    "medformer",
    "dynunet",  # MONAI DynUNet (nnU-Net-like) adapter
    "swinunetr",  # MONAI SwinUNETR adapter
]
FusionStage = Literal["enc2", "enc3", "bottleneck", "dec1", "dec2"]
# Architectures with the per-channel stem of `channel_fusion: mean` (hermes/models/channel_stem.py).
CHANNEL_FUSION_ARCHITECTURES = ("hermes_resunet", "resunet")


class ModelConfig(Strict):
    architecture: Architecture = "hermes_resunet"
    # Named size: tiny (CPU tests/demo), small, base (the paper: widths 32..320, ~61M params).
    preset: Literal["tiny", "small", "base"] = "tiny"
    # Input channels of the plain first convolution (channel_fusion: none). Every training
    # dataset must then have exactly this many channels.
    in_channels: int = 1
    # How the input channels enter the network (docs/architecture.md, "Input channels"):
    # "none": one plain convolution over `in_channels` stacked channels (every channel needed,
    # one fixed channel count); "mean": one shared stem runs on each channel separately,
    # conditioned on that channel's modality, and the features are averaged over the channels
    # present (HeMIS-style), so datasets with 1, 2 or 4 channels train one model and a missing
    # channel at prediction is left out of the mean. Hermes-R and resunet only. The default
    # stays "none": it is the network every measured recipe (demo, benchmarks) used, the value
    # every model saved before the option loads as, and what the other architectures offer;
    # set "mean" for a catalog whose datasets have different channel counts.
    channel_fusion: Literal["none", "mean"] = "none"
    # Optional overrides of the preset (None keeps the preset's value).
    widths: list[int] | None = None
    blocks_per_stage: list[int] | None = None
    # Per down-sampling step, stride per axis, e.g. [[2,2,1],[2,2,2],...] for anisotropic data.
    downsample: list[list[int]] | None = None
    norm: Literal["instance", "batch", "group"] = "instance"
    # --- Hermes context priors (ignored by the traditional architectures) ---
    fusion_stages: list[FusionStage] = Field(
        default_factory=lambda: ["enc2", "enc3", "bottleneck", "dec1", "dec2"]
    )
    # Fusion blocks per stage, same order as `fusion_stages`; None: the preset's (paper 2/2/4/2/2).
    fusion_blocks: list[int] | None = None
    modality_priors: bool = True  # ablation: False drops the modality pool and head
    modality_tokens: int = 10  # tokens per modality (paper: 10)
    multiscale_prototypes: bool = True  # ablation: False uses only the last stage's posteriors
    prototype_dim: int | None = None  # None: the final decoder width ("linear"), 32 ("mlp")
    # What the prototypes are dotted with at every voxel. "linear": the final decoder features
    # (linearly projected when prototype_dim differs: no more rank than the decoder width, 8 for
    # the tiny preset); "mlp": a per-voxel two-layer MLP of them (1x1 conv, norm, LeakyReLU,
    # 1x1 conv) to prototype_dim, so that many tasks with conflicting protocols (a kidney that
    # includes its tumour in one dataset and excludes it in another) get separable directions.
    # "mlp" is the default: on the synthetic screen (docs/benchmarks.md 1g) "linear" lost whole
    # tasks (aorta, kidney tumour at Dice 0); models saved before the option load as "linear".
    feature_head: Literal["linear", "mlp"] = "mlp"
    attention_head_dim: int = 32  # paper: dim_head 32, heads = width / 32
    # "dot": the paper's bare prototype . feature logit; "affine": plus a learned scale and bias
    # per task (hermes/models/heads.py TaskLogitCalibration).
    prototype_logit: Literal["dot", "affine"] = "affine"
    # Hermes: the image features read the selected task tokens, so the requested task list is
    # context (query a dataset's full task list, as the paper's oracle does). False: features
    # read only the modality tokens; each task's mask is then independent of the other
    # requested tasks (any subset gives identical logits). Needs modality_priors.
    task_conditioned_features: bool = True
    # Extra outputs at 1/2 and 1/4 resolution (Hermes-M's auxiliary head is the 1/4 one).
    deep_supervision: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.fusion_blocks is not None and len(self.fusion_blocks) != len(self.fusion_stages):
            raise ValueError("fusion_blocks must have one entry per fusion stage")
        if len(set(self.fusion_stages)) != len(self.fusion_stages):
            raise ValueError("fusion_stages has duplicates")
        hermes = self.architecture.startswith("hermes_")
        if hermes and not self.fusion_stages:
            raise ValueError("a Hermes architecture needs at least one fusion stage")
        if hermes and not self.task_conditioned_features and not self.modality_priors:
            raise ValueError("task_conditioned_features: false needs modality_priors (nothing left to read)")
        if self.in_channels < 1:
            raise ValueError("in_channels must be at least 1")
        if self.channel_fusion == "mean":
            if self.architecture not in CHANNEL_FUSION_ARCHITECTURES:
                raise ValueError(
                    f"channel_fusion: mean is implemented for {', '.join(CHANNEL_FUSION_ARCHITECTURES)}, "
                    f"not {self.architecture} (use channel_fusion: none)"
                )
            if self.in_channels != 1:
                raise ValueError(
                    "in_channels applies to channel_fusion: none; with channel_fusion: mean the stem reads "
                    "each channel on its own (any count per dataset): leave in_channels at 1"
                )
        return self


# --------------------------------------------------------------------------------------------
# Data: sampling and augmentation (training time)
# --------------------------------------------------------------------------------------------
class AugmentConfig(Strict):
    enabled: bool = True
    # Spatial (one affine per sample, applied to image and labels together).
    spatial_prob: float = 0.5
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.25)
    elastic: bool = False
    elastic_grid: int = 4  # control points per axis of the random displacement field
    elastic_magnitude: tuple[float, float] = (0.0, 3.0)  # std of the displacement, voxels
    mirror_axes: list[int] = Field(default_factory=list)  # none by default: left/right matters
    # Intensity: probability of each transform, per modality family ("default" for the rest).
    intensity_prob: dict[str, float] = Field(default_factory=lambda: {"default": 0.15, "mr": 0.2})
    noise_std: tuple[float, float] = (0.0, 0.1)
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness: tuple[float, float] = (0.75, 1.25)
    contrast: tuple[float, float] = (0.75, 1.25)
    gamma: tuple[float, float] = (0.7, 1.5)
    low_resolution: tuple[float, float] = (1.0, 2.0)  # zoom-out factor of simulated low-res


class DataConfig(Strict):
    patch_size: list[int] = Field(default_factory=lambda: [64, 64, 64])
    batch_size: int = 2
    # Share of patches centred on a voxel of a randomly chosen labelled class.
    foreground_fraction: float = 0.5
    # Default dataset weights: n_cases ** sampling_power (0: uniform over datasets,
    # 1: uniform over cases). Explicit `dataset_weights` override per dataset name.
    sampling_power: float = 0.5
    dataset_weights: dict[str, float] | None = None
    # Share of samples drawn task-first: a task uniformly over all tasks of the training
    # datasets, a case containing it, a patch centred on one of its voxels (rare tasks such as
    # small tumours then get 1/n_tasks of these patches). The rest are drawn dataset-first
    # (dataset by the weights above, case uniform, `foreground_fraction`). 0: dataset-first only.
    task_balance: float = Field(default=0.0, ge=0.0, le=1.0)
    # Modality-prompt dropout: share of samples whose modality prior in the model's prompt is
    # replaced by the unknown modality (the modality loss still uses the true modality). It
    # trains the path `hermes predict` takes without --modality (modality head and
    # segmentation under the unknown prior), which otherwise never sees a training step.
    # 0.2: one sample in five, enough for the unknown path to be trained every few steps while
    # 80% of the steps keep the given-modality prompt that evaluation and --modality use.
    modality_dropout: float = Field(default=0.2, ge=0.0, le=1.0)
    # Channel dropout: each channel of a multi-channel sample is left out of the model's input
    # (its channel_mask entry set False) with this probability, never all channels of a sample
    # (if every channel is drawn, one of them, chosen at random, stays). A missing sequence at
    # prediction is then an input the model has trained on. Acts only with
    # model.channel_fusion: mean (a plain first convolution needs every channel) and only on
    # samples with several channels. 0.25: a 4-sequence sample keeps all four channels in 32%
    # of the draws (0.75^4) and misses one in 42%, so the complete input that evaluation uses
    # stays the most frequent case while every one-missing combination is trained.
    channel_dropout: float = Field(default=0.25, ge=0.0, le=1.0)
    num_workers: int = 2
    # Cases held out from each dataset's training split for validation during training.
    val_fraction: float = 0.1
    val_min_cases: int = 1
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, value: list[int]) -> list[int]:
        if len(value) != 3 or min(value) < 8:
            raise ValueError("patch_size needs three sizes of at least 8 voxels")
        return value


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
class OptimConfig(Strict):
    name: Literal["lamb", "adamw", "sgd"] = "lamb"
    lr: float = 2e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    momentum: float = 0.99  # sgd (nesterov)
    grad_clip: float | None = 1.0  # global gradient-norm clip (paper: 1.0)
    warmup_steps: int = 50
    # linear: lr * (step+1)/W; exp: the reference code's lr * exp(10 * (step/W - 1)).
    warmup: Literal["linear", "exp"] = "linear"
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    min_lr_ratio: float = 0.0
    # "split": biases, normalisation parameters, prior tokens and logit calibrations get no
    # weight decay and no LAMB trust ratio (zero-initialised tensors cannot move under a
    # ||w||/||update|| ratio); "single": one group for everything (the paper's recipe).
    param_groups: Literal["split", "single"] = "split"


class LossConfig(Strict):
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    # "sample": mean over each sample's own tasks, then over samples (every sample weighs the
    # same); "pair": the paper's mean over all (sample, task) pairs of the batch, which favours
    # datasets with many tasks. See hermes/training/loss.py.
    reduction: Literal["sample", "pair"] = "sample"
    modality_weight: float = 0.01  # paper: 0.01; ignored for the unknown modality
    deep_supervision_weights: list[float] | None = None  # None: halve per level


class MedContextConfig(Strict):
    """MedContext (Gani et al. 2024): masked student pass + EMA teacher consistency."""

    enabled: bool = False
    # Fraction of mask cells hidden per sample (exactly round(ratio * cells), half up).
    mask_ratio: float = Field(default=0.6, ge=0.0, le=1.0)
    # Mask cell size in voxels (x, y, z); the cell grid gets a random offset per sample.
    mask_patch: list[int] = Field(default_factory=lambda: [16, 16, 16])
    # "blocks": 3-D cells. "tubes": the same (x, y) cells hidden in every z slab (VideoMAE-style
    # tubes along the last spatial axis; mask_ratio counts x-y cells, mask_patch's z is unused).
    # Tubes hide a structure on every slice, so context must come from in-plane neighbours.
    mask_shape: Literal["blocks", "tubes"] = "blocks"
    mask_value: float = 0.0  # in normalised intensity units (0 = the z-score mean; see docs/medcontext.md)
    consistency_weight: float = Field(default=1.0, ge=0.0)
    consistency_rampup_steps: int = Field(default=0, ge=0)  # linear 0 -> weight; 0: no ramp
    # When set, the consistency weight is chosen every step so that the weighted consistency
    # term equals this fraction of the (detached) clean segmentation loss; it replaces
    # consistency_weight (the ramps still multiply). At weight 1 the term measured ~1 % of the
    # supervised loss in the few-shot benchmark, too small to act. None: the fixed weight.
    consistency_target_fraction: float | None = Field(default=None, gt=0.0)
    masked_supervision_weight: float = Field(default=1.0, ge=0.0)
    # Linear ramp 0 -> 1 over the first N steps of BOTH MedContext terms (masked supervision and
    # consistency), so the masked pass does not pull on a network that cannot segment yet;
    # consistency_rampup_steps still multiplies the consistency term. 0: no ramp.
    masked_rampup_steps: int = Field(default=0, ge=0)
    # Teacher EMA momentum per optimiser step. "constant": min(1 - 1/(step+1), teacher_momentum)
    # (the Hermes warm-up). "cosine": from teacher_momentum_start at step 0 to teacher_momentum
    # at the run's last step along a half cosine (BYOL / DINO); needs a separate teacher.
    teacher_momentum: float = Field(default=0.996, ge=0.0, lt=1.0)
    teacher_momentum_schedule: Literal["constant", "cosine"] = "constant"
    teacher_momentum_start: float = Field(default=0.99, ge=0.0, lt=1.0)  # cosine only
    # Tasks (names or unambiguous short names) excluded from supervision inside masked
    # regions, e.g. lesions that context cannot predict (also from consistency there).
    exclude_tasks: list[str] = Field(default_factory=list)
    # True: the teacher is the validation EMA (one copy of the weights less; the trainer then
    # runs that EMA with `teacher_momentum` instead of `ema_decay`); False: a separate copy.
    reuse_validation_ema: bool = False
    # Every N steps, log each term's gradient norm and its share of their sum (grad_norm_*,
    # grad_share_* in train_log.csv and TensorBoard), so a user sees whether the context term
    # acts at all. Costs one extra backward per term on those steps; None: never.
    term_gradients_every: int | None = Field(default=100, ge=1)

    @field_validator("mask_patch")
    @classmethod
    def _mask_patch(cls, value: list[int]) -> list[int]:
        if len(value) != 3 or min(value) < 1:
            raise ValueError("mask_patch needs three positive voxel counts")
        return value

    @model_validator(mode="after")
    def _cosine_needs_own_teacher(self) -> MedContextConfig:
        # A reused validation EMA is updated by the trainer at a fixed momentum, not by MedContext.
        if self.teacher_momentum_schedule == "cosine" and self.reuse_validation_ema:
            raise ValueError("teacher_momentum_schedule 'cosine' needs reuse_validation_ema: false")
        return self


class ValidationConfig(Strict):
    every_steps: int = 200
    mode: Literal["patch", "full"] = "full"
    max_cases_per_dataset: int = 4
    overlap: float = 0.25


class TrainConfig(Strict):
    catalog: Path
    cache: Path
    output: Path
    paradigm: Literal["universal", "traditional"] = "universal"
    dataset: str | None = None  # traditional: the one dataset to train on
    seed: int = 0
    steps: int = 2000
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    deterministic: bool = False
    # CPU intra-op threads while training. "auto": start with the threads the process was given
    # (OMP_NUM_THREADS or torch's default) and keep measuring whether one fewer is faster, which
    # it is when another process takes a core (runtime.ThreadTuner, docs/bench/busy_core.md).
    # The count may change during a run, so the last bits of the weights can differ between runs;
    # `deterministic: true` or a number fixes it. Ignored on CUDA.
    cpu_threads: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # torch.compile (inductor) the training network. Off by default: on this project's CPU
    # (tiny, 2x48^3, bf16 channels-last, one thread) the compiled step was 1.107 s against
    # 0.950 s eager, after 199 s of compiling (docs/benchmarks.md 2a, bench/compile_speed.py).
    # Not yet measured on a GPU.
    compile: bool = False
    ema_decay: float = 0.99
    # Cap of the EMA's averaging window (1 / (1 - decay) steps) as a fraction of the planned run,
    # so that a short run's EMA is not dominated by its first, poor weights (200 steps at decay
    # 0.99 average over half the run). None: the fixed `ema_decay` (the paper's).
    ema_window_fraction: float | None = Field(default=0.1, gt=0.0, le=1.0)
    # Weights saved as the model: "ema", "raw" (the optimiser's), or "best": both are validated
    # at the end and the higher validation Dice wins (EMA without validation cases).
    final_weights: Literal["ema", "raw", "best"] = "best"
    checkpoint_every: int = 200
    log_every: int = 10
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    medcontext: MedContextConfig = Field(default_factory=MedContextConfig)

    @model_validator(mode="after")
    def _paradigm(self) -> TrainConfig:
        if self.paradigm == "traditional" and not self.dataset:
            raise ValueError("paradigm 'traditional' needs `dataset` (the one dataset to train on)")
        return self


# --------------------------------------------------------------------------------------------
# Inference and evaluation
# --------------------------------------------------------------------------------------------
class InferenceConfig(Strict):
    # Ranges also checked here for API users (the CLI checks them at parse time).
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    window_batch_size: int = Field(2, ge=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    mirror_tta: bool = False
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Overlapping task masks in the multi-label output: the most probable task wins.
    output: Literal["multilabel", "binary"] = "multilabel"
    # A DICOM series with uneven slice gaps (a missing slice) is refused unless this is set;
    # then it is resampled onto a regular grid from its true positions (hermes/data/dicom.py).
    allow_irregular_dicom: bool = False
    # Apply MODEL/postprocessing.json (per-task largest component; `hermes evaluate --choose-postprocessing`).
    postprocess: bool = True
    # Memory budget of the whole process in GiB: each prompt group's tasks are predicted in
    # chunks that fit it (hermes/inference/chunks.py); None: all tasks in one pass. 4 GB lets
    # an 8 GB laptop predict a 512x512x300 CT with dozens of tasks in one chunk.
    max_memory_gb: float | None = Field(4.0, gt=0.0)


class EvaluationConfig(Strict):
    nsd_tolerance_mm: float = 2.0
    hd_percentile: float = 95.0
    bootstrap_samples: int = 1000
    seed: int = 0
    # Processes scoring cases in parallel (surface distances are CPU-bound); 1: in-process.
    workers: int = 2
    # Report: overlay figures per dataset (best, median, worst case by mean Dice).
    report_cases: int = 3


# --------------------------------------------------------------------------------------------
# Adaptation: transfer (`hermes finetune`) and incremental learning (`hermes extend`)
# --------------------------------------------------------------------------------------------
TokenInit = Literal["mean", "random", "copy"]


class WarmStartConfig(Strict):
    """How the rows added to the prior pools (new tasks, new modalities) start.

    Old rows are copied bit-exactly. ``mean``: the mean of the old pool's real rows (a neutral
    "some structure" token, plus 10% of a fresh random row to tell new tasks apart);
    ``random``: the fresh initialisation of a new model; ``copy``: the row of the existing
    task/modality named in ``task_from``/``modality_from`` (mandatory for every new name then).
    ``task_from`` entries also override ``task_init`` per task, e.g.
    ``{"NewLiverCT/liver": "AbdomenCT/liver"}``.
    """

    task_init: TokenInit = "mean"
    task_from: dict[str, str] = Field(default_factory=dict)
    modality_init: TokenInit = "mean"
    modality_from: dict[str, str] = Field(default_factory=dict)


class AdaptationConfig(Strict):
    """Shared by finetune and extend: start from a trained model, train on new data.

    ``catalog`` describes the NEW data (its datasets, their labels and tasks); it is merged with
    the base model's catalog: tasks with a name the model knows keep their token, others get
    new rows. ``cache`` is that catalog's `hermes prepare` output. The model architecture is the
    base model's; the data/optim/loss sections default to values suited to short adaptation.
    """

    base_model: Path
    catalog: Path
    cache: Path
    output: Path
    # Datasets of `catalog` to train on (None: all of them).
    datasets: list[str] | None = None
    # Few-shot: at most this many training cases per dataset (a seeded random subset; None: all).
    max_train_cases: int | None = None
    seed: int = 0
    steps: int = 300
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    ema_decay: float = 0.99
    log_every: int = 10
    # "backbone": only the prior pools, fusion blocks and heads train (the convolutional
    # encoder/decoder keep the base model's weights); "none": everything trains.
    freeze: Literal["none", "backbone"] = "none"
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    # None: the base model's training-time data settings (patch size, augmentation...).
    data: DataConfig | None = None
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    loss: LossConfig = Field(default_factory=LossConfig)


class FinetuneConfig(AdaptationConfig):
    """`hermes finetune`: transfer to new data; the old tasks are not protected."""


class ExtendConfig(AdaptationConfig):
    """`hermes extend`: add tasks while keeping the old ones (rehearsal, distillation, gate)."""

    # None: replace `base_model` in place (only if the forgetting gate passes).
    output: Path | None = None  # type: ignore[assignment]
    # Cache of the base model's own datasets (its `hermes prepare` output): the rehearsal
    # buffer comes from its training cases. None disables rehearsal.
    old_cache: Path | None = None
    rehearsal_cases: int = 4  # per old dataset, drawn once (seeded) from its training split
    rehearsal_batch: int = 1  # old samples appended to every batch of new samples
    # Distillation: the frozen base model's sigmoid outputs on the new images, for the old
    # tasks of one old dataset with the same modality (its task list, as in training).
    distill_weight: float = 1.0
    distill_loss: Literal["mse", "bce"] = "mse"
    # Forgetting gate: the old tasks are evaluated on their test sets before and after; if any
    # old task's mean Dice drops by more than this (Dice points, 0-100) the model is not
    # overwritten (the new one is written alongside as `<output>.rejected`).
    forgetting_tolerance: float = 2.0
    # Old datasets evaluated by the gate (None: every base-model dataset with test cases).
    gate_datasets: list[str] | None = None
    gate_max_cases: int | None = None  # per dataset; None: all test cases

    @model_validator(mode="after")
    def _protect(self) -> ExtendConfig:
        if self.rehearsal_cases < 0 or self.rehearsal_batch < 0 or self.distill_weight < 0:
            raise ValueError("rehearsal_cases, rehearsal_batch and distill_weight must be >= 0")
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
SectionT = TypeVar("SectionT", bound=BaseModel)


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see hermes/config.py for valid keys)"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning parse errors into a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(model_type: type[SectionT], data: dict[str, Any], source: str = "<dict>") -> SectionT:
    """Validate a dict into a config object; errors name the key and the source."""
    try:
        return model_type.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `override` into a copy of `base` (mappings merge, other values replace)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return read_yaml(path)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a training config. A top-level ``preset: NAME`` key starts from that preset.

    Relative paths (catalog, cache, output) are resolved against the config file's folder, so
    a config and its catalog can be moved together.
    """
    path = Path(path)
    data = read_yaml(path)
    preset = data.pop("preset", None)
    if preset is not None:
        data = deep_merge(load_preset(str(preset)), data)
    if overrides:
        data = deep_merge(data, overrides)
    for key in ("catalog", "cache", "output"):
        if key in data and data[key] is not None and not Path(str(data[key])).is_absolute():
            data[key] = str((path.parent / str(data[key])).resolve())
    return validate(TrainConfig, data, str(path))


def dump_config(config: BaseModel) -> str:
    """YAML text of a config object (paths as strings), for saving next to a model."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
