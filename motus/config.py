"""The platform's configuration: `params.yaml` and the `MOTUS_*` environment.

`params.yaml` is the one file a platform team edits. It names the data tiers and their sources, the three
stage recipes, the model preset, the promotion gates and the GPU pools. Everything in it is validated here,
before any data is read or any GPU is touched:

* every model forbids unknown keys, so a typo (`lerning_rate`) is an error, not a silently ignored key;
* the loader reports *every* problem in one go, each with its key path
  (`params.yaml: stages.stage1.lr: Input should be greater than 0`);
* checks that span sections (a stage names a tier that does not exist, a stage starts from a model no stage
  registers) are reported with the key path of the offending entry, in the same report.

The environment (where MLflow lives, where the DVC remote is, which launcher runs training jobs) is not part
of `params.yaml`: it differs per machine, not per experiment. It comes from `MOTUS_*` variables or a `.env`
file through `Settings`.

This module is the leftmost room of the package: it imports nothing from the rest of `motus`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "ConfigError",
    "FlowSettings",
    "LatentActionSection",
    "CostConfig",
    "DataConfig",
    "WindowConfig",
    "FlowConfig",
    "Gate",
    "ModelConfig",
    "ModelWeights",
    "Params",
    "Pool",
    "ProjectConfig",
    "Rule",
    "Settings",
    "Stage",
    "Tier",
    "TierSource",
    "config_hash",
    "get_settings",
    "load_params",
    "resolved_dict",
    "settings_errors",
    "validate_params",
]

DEFAULT_PARAMS_FILE = Path("params.yaml")

# The error type the root model raises for problems that span sections; the loader unpacks its context
# into one `(key_path, message)` entry per problem.
_CONSISTENCY_ERROR = "params_consistency"


# Counts (steps, batch sizes, episodes, intervals) above this are typing accidents (`steps: 1e30`), not plans.
MAX_COUNT = 2**31 - 1


def _numeric_kinds(annotation: Any) -> set[type]:
    """int / float among a field's annotation (through Optional and unions)."""
    if annotation in (int, float):
        return {annotation}
    return {a for a in get_args(annotation) if a in (int, float)}


class _Section(BaseModel):
    """Base of every params.yaml model: unknown keys are errors; numbers are finite, never booleans, and counts
    are below `MAX_COUNT`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _sane_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        kinds = _numeric_kinds(field.annotation) if field is not None else set()
        if not kinds:
            return value
        if isinstance(value, bool):  # YAML's `true` would otherwise be read as 1
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        if kinds == {int} and isinstance(value, (int, float)) and math.isfinite(value) and abs(value) > MAX_COUNT:
            raise ValueError(f"{value:g} is beyond any count a job could reach (at most {MAX_COUNT})")
        return value


# --------------------------------------------------------------------------------------------- project


class ProjectConfig(_Section):
    """Who this configuration belongs to."""

    name: str = Field("motus", min_length=1, description="Project name; used for MLflow experiment names.")
    seed: int = Field(0, description="Global random seed for data sampling and model initialisation.")


# ----------------------------------------------------------------------------------------------- model


class ModelWeights(_Section):
    """Local paths to pretrained weights. The platform never downloads weights; it reads them from here."""

    video: Path | None = Field(
        None, description="Video generation backbone (Wan 2.2 5B for the full preset)."
    )
    vae: Path | None = Field(None, description="Video VAE matching the video backbone.")
    text: Path | None = Field(
        None, description="T5 text encoder for the video expert (umt5-xxl for Wan 2.2); None = tiny stand-in."
    )
    vlm: Path | None = Field(
        None, description="Vision-language model for the understanding expert (Qwen3-VL-2B)."
    )


class FlowConfig(_Section):
    """Rectified-flow training and sampling; one timestep per modality (video, action)."""

    video_loss_weight: float = Field(1.0, ge=0, description="Weight of the video flow-matching loss.")
    action_loss_weight: float = Field(1.0, ge=0, description="Weight of the action flow-matching loss.")
    timestep_sampler: Literal["uniform_shift", "logit_normal"] = Field(
        "uniform_shift", description="How training timesteps are drawn."
    )
    shift: float = Field(5.0, gt=0, description="Timestep shift for `uniform_shift` (larger = noisier).")
    logit_mean: float = Field(0.0, description="Mean of the normal for `logit_normal`.")
    logit_std: float = Field(1.0, gt=0, description="Standard deviation of the normal for `logit_normal`.")
    inference_steps: int = Field(10, ge=1, description="Denoising steps at inference.")


class ModelConfig(_Section):
    """Which network to build. `tiny` runs on a CPU in seconds; `full` is Wan 2.2 5B + Qwen3-VL-2B."""

    preset: Literal["tiny", "small", "full"] = Field(
        "tiny", description="Model size preset: tiny (CPU tests), small (benchmarks), full (paper sizes)."
    )
    action_dim: int = Field(14, gt=0, description="Width of the unified action space; tiers pad into it.")
    state_dim: int = Field(14, gt=0, description="Width of the proprioceptive state.")
    geometry: Literal["robotwin", "ac-one", "tiny"] | None = Field(
        None,
        description="Named sample geometry (frames, image size, action chunk, downsample): robotwin = the official "
        "RoboTwin config (1 + 8 frames at 384x320, chunk 16, ratio 2, downsample 3); ac-one = the AC-One / Agilex "
        "config (chunk 48, ratio 6, downsample 1); None = the preset's own (full: robotwin, tiny: tiny).",
    )
    action_chunk: int | None = Field(
        None, gt=0, description="Actions predicted per step; None = the geometry's."
    )
    num_video_frames: int | None = Field(
        None, gt=0, description="Pixel frames per window, 1 + 4k (the Wan VAE's temporal stride is 4); None = the "
        "geometry's."
    )
    weights: ModelWeights = Field(default_factory=ModelWeights)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form overrides of preset fields; validated by the model room, not here.",
    )

    @field_validator("num_video_frames")
    @classmethod
    def _one_plus_four_k(cls, n: int | None) -> int | None:
        # 1 condition frame + groups of 4 future frames: each group is one latent frame of the Wan 2.2 VAE
        if n is not None and (n < 5 or (n - 1) % 4):
            raise ValueError(f"{n} is not 1 + 4k frames (k >= 1): allowed 5, 9, 13, ... (Wan VAE temporal stride 4)")
        return n


# ----------------------------------------------------------------------------------------------- tiers


class TierSource(_Section):
    """Where a tier's episodes come from. `kind` selects a reader in the data room; `options` go to it."""

    kind: str = Field(min_length=1, description="Reader kind, e.g. `simulator`, `lerobot`, `mp4-folder`.")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from .contracts import SOURCE_KINDS

        if v not in SOURCE_KINDS:
            raise ValueError(f"no reader for source kind '{v}' (readers: {', '.join(SOURCE_KINDS)})")
        return v
    options: dict[str, Any] = Field(default_factory=dict, description="Reader-specific options.")


class Tier(_Section):
    """One level of the data pyramid (1 = web data ... 6 = target-robot demonstrations)."""

    level: int = Field(ge=1, le=6, description="Pyramid level, 1 (broadest) to 6 (target robot).")
    embodiment: str = Field(min_length=1, description="Who acts in the data: `human`, `aloha`, `mixed`, ...")
    source: TierSource
    action_dim: int | None = Field(None, gt=0, description="Action width; None = unlabelled (video only).")
    action_names: list[str] | None = Field(
        None, description="Name of each action dim in order (e.g. joint names); kept in the manifest and in every "
        "export's normalisation contract, so a model is never given another joint order. None = unnamed.")
    fps: float | None = Field(
        None, gt=0, description="Frame rate of the stored episodes; None = as recorded."
    )
    description: str = ""

    @model_validator(mode="after")
    def _one_name_per_action_dim(self) -> Tier:
        if self.action_names is not None and len(self.action_names) != (self.action_dim or 0):
            raise PydanticCustomError(
                "tier_action_names", "action_names has {n} names for action_dim {d}",
                {"n": len(self.action_names), "d": self.action_dim})
        if self.action_names is not None and len(set(self.action_names)) != len(self.action_names):
            raise PydanticCustomError("tier_action_names", "action_names repeats a name")
        return self


class WindowConfig(_Section):
    """How training windows are cut: action-dense, video-sparse."""

    downsample: int | None = Field(
        None, ge=1, description="Stored frames between consecutive actions; None = the model geometry's (RoboTwin: 3)."
    )
    video_action_ratio: int | None = Field(
        None, ge=1,
        description="Actions per future video frame; None = action_chunk / (num_video_frames - 1) of the model.",
    )
    view: str | None = Field(None, description="Camera view to train on; None = the tier's first view.")
    normalization: Literal["mean_std", "min_max", "none"] = Field(
        "mean_std", description="Action/state normalisation with the tier manifest's statistics."
    )


class DataConfig(_Section):
    """Where tiers are built and how they are stored and split."""

    root: Path = Field(Path("data/tiers"), description="Folder holding one sub-folder per built tier (DVC outs).")
    codec: Literal["mp4", "npz"] = Field("mp4", description="Video storage inside shards: mp4 (H.264) or npz (lossless).")
    shard_mb: float = Field(256, gt=0, description="Target shard size in MB.")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="Episodes held out for validation, by episode.")
    window: WindowConfig = Field(default_factory=WindowConfig)
    encoder_cache: bool = Field(True, description="The pipeline encodes every tier a stage reads once (`motus data "
                                "encode`, features/encoded/<tier>); the stages then read latents, not video.")


# ---------------------------------------------------------------------------------------------- stages

Expert = Literal["video", "action", "understanding"]
# auto = bf16 mixed precision on CUDA, fp32 on CPU; bf16 = fp32 master weights + bf16 autocast (motus/train/precision.py)
Precision = Literal["auto", "bf16", "fp32"]
PositiveFloat = Annotated[float, Field(gt=0)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class Placement(_Section):
    """Where the kubernetes launcher runs a training job; the local launcher ignores it. Not part of a step's
    content key: where a job runs does not change what it computes (the global batch is split over the ranks)."""

    pool: str | None = Field(None, description="params.yaml pool the job is queued on; None = MOTUS_POOL.")
    nodes: int = Field(1, ge=1, description="Nodes: 1 Master + nodes-1 Workers, each using all of the pool's GPUs.")
    fallback: str | None = Field(
        None, description="Pool a job killed on `pool` (evicted or preempted past its restarts) is resubmitted to, "
                          "once, resuming from its latest checkpoint; None = retry on the same pool.")


class Validation(_Section):
    """How a stage measures itself on held-out windows (at step 0, every `validate_every` steps and at the end)."""

    windows: int = Field(16, ge=1, description="Held-out windows per validation, spread evenly over the stage's "
                                               "tiers and through each tier's held-out episodes.")
    draws: int = Field(3, ge=1, description="Noise draws every sampled number is averaged over (seeded: the same "
                                            "draws at every validation, so a curve moves only with the model).")


class Stage(_Section):
    """A training recipe: which tiers, which experts train, where actions come from, which parent."""

    stage: Literal[1, 2, 3] = Field(description="Motus training stage this recipe implements.")
    tiers: dict[str, PositiveFloat] = Field(
        min_length=1, description="Tier name -> sampling weight (relative, > 0)."
    )
    trains: list[Expert] = Field(min_length=1, description="Experts whose weights are updated.")
    action_source: Literal["none", "latent", "real"] = Field(
        description="Action targets: none (video only), latent (from the latent-action VAE), real (robot)."
    )
    parent: str | None = Field(
        None,
        description="Registered model whose `champion` this stage starts from; None = pretrained weights.",
    )
    steps: int = Field(ge=1, description="Optimizer steps.")
    batch_size: int = Field(ge=1, description="Global batch size (windows per step).")
    lr: float = Field(gt=0, description="Peak learning rate.")
    video_lr: float | None = Field(None, gt=0, description="Learning rate of the video expert; None = `lr`.")
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(
        False, description="Keep the fp32 optimizer partition (AdamW states) in host memory (ZeRO 1-3); what lets "
        "full Stage 3 fit one 80 GB GPU (`motus model memory`).")
    registered_model: str = Field(
        min_length=1, description="MLflow registered model the result is logged to."
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after the linear warm-up."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak (cosine/linear).")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints (and one at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Complete checkpoints kept on disk.")
    validate_every: int = Field(50, ge=1, description="Steps between held-out validations (and one at the end).")
    validation: Validation = Field(default_factory=Validation, description="Held-out windows and noise draws.")
    log_every: int = Field(1, ge=1, description="Steps between metric logs.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    precision: Precision | None = Field(None, description="auto | bf16 | fp32 for this stage; None = the global `precision`.")
    cluster: Placement = Field(default_factory=Placement, description="Pool and nodes on a cluster.")

    @model_validator(mode="after")
    def _actions_need_a_source(self) -> Stage:
        if "action" in self.trains and self.action_source == "none":
            raise PydanticCustomError(
                "stage_actions",
                "trains the action expert but action_source is 'none'; use 'latent' or 'real'",
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise PydanticCustomError(
                "stage_offload", "offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO partitions what it offloads)")
        if self.warmup_steps > self.steps:
            raise PydanticCustomError(
                "stage_warmup",
                "warmup_steps ({warmup}) exceeds steps ({steps})",
                {"warmup": self.warmup_steps, "steps": self.steps},
            )
        return self


# ----------------------------------------------------------------------------------------------- gates


class Rule(_Section):
    """One condition a candidate's metric must meet: an absolute threshold, a bound relative to another metric of
    the same evaluation, and/or no regression against the champion. A success rate can be judged statistically:
    through a confidence bound on k successes in n episodes instead of the bare fraction."""

    metric: str = Field(min_length=1, description="MLflow metric key, e.g. `val/video_loss`.")
    comparator: Literal[">=", ">", "<=", "<"] = Field(description="Direction in which the metric is good.")
    threshold: float | None = Field(None, description="Absolute bound: `metric <comparator> threshold`.")
    relative_to: str | None = Field(
        None, description="Another metric of the same evaluation: `metric <comparator> factor x relative_to`, "
                          "e.g. the model's action error against the zero-action floor.")
    factor: float = Field(1.0, gt=0, description="Multiplier of `relative_to`.")
    offset: float = Field(0.0, description="Added to `factor x relative_to`: a margin in the metric's units, for "
                                           "scores that can be negative (e.g. the trained probe R^2 >= the "
                                           "untrained one + 0.05).")
    max_regression: float | None = Field(
        None,
        ge=0,
        description="Not worse than the current champion by more than this (in the metric's units).",
    )
    statistic: Literal["wilson", "clopper-pearson"] | None = Field(
        None, description="For a success rate: judge a confidence interval of k/n, not the fraction. With "
                          "`threshold`, the interval's lower bound must clear it; with `max_regression`, the upper "
                          "bound must reach the champion's rate minus the margin (not confidently worse).")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Two-sided confidence of `statistic`.")
    min_episodes: int = Field(1, ge=1, description="Fewer episodes than this fail a statistical rule.")

    @model_validator(mode="after")
    def _needs_a_bound(self) -> Rule:
        if self.threshold is None and self.max_regression is None and self.relative_to is None:
            raise PydanticCustomError(
                "rule_without_bound", "a rule must set threshold, relative_to or max_regression"
            )
        if self.offset and self.relative_to is None:
            raise PydanticCustomError("offset_without_relative", "offset is added to factor x relative_to: set "
                                      "relative_to or remove offset")
        if self.statistic is not None:
            from .contracts import is_rate

            if not is_rate(self.metric):
                raise PydanticCustomError("statistic_needs_rate", "statistic {statistic} applies to success rates "
                                          "(eval/..._success_rate), not {metric}",
                                          {"statistic": self.statistic, "metric": self.metric})
            if self.comparator not in (">=", ">"):
                raise PydanticCustomError("rate_comparator", "a success rate is good when high: comparator >= or >, "
                                          "not {comparator}", {"comparator": self.comparator})
            if self.relative_to is not None:
                raise PydanticCustomError("statistic_relative", "a statistical rule compares with a threshold or "
                                          "the champion, not with relative_to")
        if self.threshold is not None and self.statistic is not None and not 0.0 <= self.threshold <= 1.0:
            raise PydanticCustomError("rate_threshold", "a success-rate threshold lies in [0, 1], got {t}",
                                      {"t": self.threshold})
        return self


class Gate(_Section):
    """Promotion policy of one registered model: every rule must pass, every required tag must be present."""

    rules: list[Rule] = Field(default_factory=list)
    required_tags: list[str] = Field(default_factory=list, description="Run tags a candidate must carry.")


# ----------------------------------------------------------------------------------------------- pools


class Pool(_Section):
    """A group of identical nodes a training job can be scheduled on."""

    gpu: Literal["A100", "H100", "cpu"]
    gpus_per_node: int = Field(ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Kubernetes tolerations.")
    queue: str | None = Field(None, description="Kueue LocalQueue jobs are submitted to.")

    @model_validator(mode="after")
    def _gpu_count_matches_kind(self) -> Pool:
        if self.gpu == "cpu" and self.gpus_per_node != 0:
            raise PydanticCustomError("pool_gpus", "a cpu pool must have gpus_per_node: 0")
        if self.gpu != "cpu" and self.gpus_per_node == 0:
            raise PydanticCustomError("pool_gpus", "a {gpu} pool needs gpus_per_node >= 1", {"gpu": self.gpu})
        return self


class FlowSettings(_Section):
    """Optical flow between frames `stride` apart, rendered as RGB flow images for the latent-action VAE."""

    model: Literal["dis", "torchscript"] = Field("dis", description="OpenCV DIS on CPU, or a learned TorchScript model.")
    preset: Literal["ultrafast", "fast", "medium"] = Field("medium", description="DIS preset.")
    weights: Path | None = Field(None, description="Local TorchScript flow model (RAFT/DPFlow export) for model=torchscript.")
    image_size: int = Field(16, ge=8, description="Side of the flow images the VAE sees.")
    max_magnitude: float | None = Field(
        None, gt=0, description="Flow magnitude (pixels) mapped to full colour saturation; None = per-clip p99.")
    stride: int | None = Field(
        None, ge=1, description="Frames between the two images of a flow pair; None = the training window's "
        "downsample, so each latent stands for the motion between two actions a Stage 2 window samples.")
    views: dict[str, list[str]] = Field(
        default_factory=dict, description="Per tier, the camera views whose flow is composed into one flow image "
        "(the first over the top half, the others side by side below: head over wrists, as Motus composes "
        "real-robot frames); a tier not named here: its first view.")

    @field_validator("views")
    @classmethod
    def _views_named_once(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for tier, names in v.items():
            if not names or len(set(names)) != len(names):
                raise ValueError(f"views of tier '{tier}' must name at least one view, each once (got {names})")
        return v


class LatentActionSection(_Section):
    """The latent-action VAE (optical flow -> DC-AE -> 14-d latent) that feeds Stage 2."""

    preset: Literal["tiny", "full"] = Field("tiny", description="VAE size preset.")
    weights: Path | None = Field(None, description="Local pretrained DC-AE folder (diffusers format) for `full`.")
    tiers: list[str] | None = Field(None, description="Tiers to train on; None = the tiers of the Stage 2 recipe.")
    labelled_fraction: float = Field(0.1, ge=0, le=1, description="Share of each batch drawn from 14-d labelled tiers.")
    heldout_fraction: float | None = Field(
        None, ge=0, le=1, description="Episodes of the VAE's tiers held out of its training, on which its probe "
        "R^2 is scored; None = data.heldout_fraction. The probe needs a few held-out episodes per embodiment "
        "to mean anything; the latent actions are exported for every episode either way.")
    action_target: Literal["delta", "absolute"] = Field(
        "delta", description="Align the latent with the step's action change (what flow sees) or the raw action.")
    lambda_action: float = Field(1.0, ge=0, description="Weight of ||z - a_real||^2 on labelled samples.")
    beta_kl: float = Field(1e-6, ge=0, description="Weight of the KL term.")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Precision | None = Field(None, description="auto | bf16 | fp32 for the VAE job; None = the global `precision`.")
    checkpoint_every: int = Field(100, ge=1)
    validate_every: int = Field(100, ge=1)
    registered_model: str = Field("motus-lam", min_length=1)
    flow: FlowSettings = Field(default_factory=FlowSettings)
    cluster: Placement = Field(default_factory=Placement, description="Pool and nodes on a cluster.")


class CostConfig(_Section):
    """Prices that turn device hours into money in every run's accounting."""

    currency: str = Field("USD", min_length=1)
    device_hour: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 0.05, "A100": 1.80, "H100": 3.50},
        description="Price of one device-hour by device type (cpu, A100, H100, ...).",
    )


# ------------------------------------------------------------------------------------------------ root


class EvaluationConfig(_Section):
    """How the pipeline's evaluate step judges a target-robot model (motus/evaluate)."""

    seeds: int = Field(4, ge=1, description="Closed-loop episodes per task, on seeds first_seed, first_seed+1, ...")
    first_seed: int = Field(1000, ge=1000, description="Evaluation seeds start here (the demo tiers use seeds below).")
    tasks: list[Literal["transfer_cube", "insertion"]] = Field(
        default_factory=lambda: ["transfer_cube", "insertion"], description="gym-aloha tasks to roll out.")
    max_steps: int = Field(400, ge=1, description="Episode length cap (gym-aloha's own limit is 400).")
    video_episodes: int = Field(1, ge=0, description="Rollouts per mode and task kept as MLflow videos.")
    windows_per_tier: int = Field(8, ge=1, description="Held-out windows per tier for the offline metrics.")
    draws: int = Field(3, ge=1, description="Seeded noise draws every offline sampled number is averaged over.")
    workers: int | None = Field(None, ge=1, description="Rollout processes; null = min(cores, rollouts).")


class Params(_Section):
    """All of `params.yaml`. Every section has a default, so an empty file is a valid (tiny, local) config."""

    project: ProjectConfig = Field(default_factory=ProjectConfig)
    precision: Precision = Field(
        "auto", description="Training precision of every job: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tiers: dict[str, Tier] = Field(default_factory=dict)
    stages: dict[str, Stage] = Field(default_factory=dict)
    gates: dict[str, Gate] = Field(default_factory=dict, description="Keyed by registered model name.")
    pools: dict[str, Pool] = Field(default_factory=dict)
    costs: CostConfig = Field(default_factory=CostConfig)
    latent_action: LatentActionSection = Field(default_factory=LatentActionSection)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _sections_agree(self) -> Params:
        problems = _consistency_problems(self.model_dump())
        if problems:
            raise PydanticCustomError(
                _CONSISTENCY_ERROR,
                "{detail}",
                {"detail": "; ".join(f"{key}: {msg}" for key, msg in problems), "problems": problems},
            )
        return self


def _consistency_problems(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Checks that span sections, as `(key_path, message)`.

    Works on plain data (a dumped `Params`, or the raw YAML when it failed structural validation), so that a
    file with both a bad value and a dangling reference gets both reported. Entries of the wrong shape are
    skipped: structural validation reports those.
    """

    def mapping(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    problems: list[tuple[str, str]] = []
    tiers = mapping(data.get("tiers"))
    stages = {name: mapping(stage) for name, stage in mapping(data.get("stages")).items()}
    model = mapping(data.get("model"))

    # Which stage registers which model.
    registered: dict[str, str] = {}
    for name, stage in stages.items():
        model_name = stage.get("registered_model")
        if not isinstance(model_name, str):
            continue
        if model_name in registered:
            problems.append(
                (
                    f"stages.{name}.registered_model",
                    f"'{model_name}' is already registered by stage '{registered[model_name]}'",
                )
            )
        else:
            registered[model_name] = name

    pools = mapping(data.get("pools"))
    placed = [(f"stages.{n}", st) for n, st in stages.items()] + [("latent_action", mapping(data.get("latent_action")))]
    for where, section in placed:
        cluster = mapping(section.get("cluster"))
        for key in ("pool", "fallback"):
            pool = cluster.get(key)
            if isinstance(pool, str) and pool not in pools:
                known = ", ".join(sorted(map(str, pools))) or "none defined"
                problems.append((f"{where}.cluster.{key}", f"unknown pool '{pool}' (known pools: {known})"))
        if cluster.get("fallback") is not None and cluster.get("fallback") == cluster.get("pool"):
            problems.append((f"{where}.cluster.fallback", "the fallback pool is the job's own pool; name another "
                                                           "pool or remove it"))

    model_action_dim = model.get("action_dim", ModelConfig.model_fields["action_dim"].default)
    for name, stage in stages.items():
        for tier_name in mapping(stage.get("tiers")):
            if tier_name not in tiers:
                known = ", ".join(sorted(map(str, tiers))) or "none defined"
                problems.append((f"stages.{name}.tiers.{tier_name}", f"unknown tier (known tiers: {known})"))
                continue
            tier = mapping(tiers[tier_name])
            if stage.get("action_source") == "real":
                tier_action_dim = tier.get("action_dim")
                if tier_action_dim is None:
                    problems.append(
                        (
                            f"stages.{name}.tiers.{tier_name}",
                            "stage trains on real actions but the tier is unlabelled (no action_dim)",
                        )
                    )
                elif (
                    isinstance(tier_action_dim, int)
                    and isinstance(model_action_dim, int)
                    and tier_action_dim > model_action_dim
                ):
                    problems.append(
                        (
                            f"stages.{name}.tiers.{tier_name}",
                            f"tier action_dim {tier_action_dim} does not fit model.action_dim {model_action_dim}",
                        )
                    )

        parent = stage.get("parent")
        if isinstance(parent, str):
            owner = registered.get(parent)
            if owner is None or owner == name:
                others = sorted(m for m, s in registered.items() if s != name)
                problems.append(
                    (
                        f"stages.{name}.parent",
                        f"'{parent}' is not the registered_model of another stage "
                        f"(registered by other stages: {', '.join(others) or 'none'})",
                    )
                )

    # A parent chain that loops back can never start.
    for name in stages:
        chain = [name]
        while True:
            parent = stages[chain[-1]].get("parent")
            nxt = registered.get(parent) if isinstance(parent, str) else None
            if nxt is None or nxt == chain[-1]:
                break
            if nxt in chain:
                cycle = " -> ".join([*chain, nxt])
                problems.append((f"stages.{name}.parent", f"parent chain forms a cycle: {cycle}"))
                break
            chain.append(nxt)

    for tier_name in mapping(mapping(mapping(data.get("latent_action")).get("flow")).get("views")):
        if tier_name not in tiers:
            problems.append((f"latent_action.flow.views.{tier_name}", f"unknown tier (known tiers: "
                                                                       f"{', '.join(sorted(map(str, tiers)))})"))
    lam_model = mapping(data.get("latent_action")).get("registered_model", LatentActionSection.model_fields[
        "registered_model"].default)
    if isinstance(lam_model, str) and lam_model in registered:
        problems.append(("latent_action.registered_model", f"'{lam_model}' is already registered by stage "
                                                           f"'{registered[lam_model]}'"))
    elif isinstance(lam_model, str):
        registered[lam_model] = "latent_action"
    for gate_name in mapping(data.get("gates")):
        if gate_name not in registered:
            problems.append(
                (
                    f"gates.{gate_name}",
                    "neither a stage nor latent_action registers this model (registered models: "
                    f"{', '.join(sorted(registered)) or 'none'})",
                )
            )

    problems += _gate_rule_problems(mapping(data.get("gates")), mapping(data.get("evaluation")))

    if model.get("preset") == "full":
        weights = mapping(model.get("weights"))
        for key in ("video", "vae", "vlm", "text"):
            if weights.get(key) in (None, ""):
                problems.append(
                    (f"model.weights.{key}", "the full preset needs a local path to pretrained weights")
                )

    return problems


def _gate_rule_problems(gates: Mapping[str, Any], evaluation: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Gate rules that could never be judged as written: a `val/` metric validation does not log, an `eval/` metric
    the evaluation does not report (or a task it does not roll out), and statistical rules the evaluation's
    episodes cannot satisfy (fewer episodes than `min_episodes`, or a threshold that even a perfect run's lower
    confidence bound stays below)."""
    from .contracts import (
        EVALUATION_METRICS,
        LATENT_ACTION_METRICS,
        LATENT_ACTION_PER_EMBODIMENT,
        VALIDATION_METRICS,
        episodes_for,
        rate_interval,
    )

    defaults = EvaluationConfig()
    seeds = evaluation.get("seeds", defaults.seeds)
    tasks = evaluation.get("tasks", defaults.tasks)
    if not isinstance(seeds, int) or not isinstance(tasks, list):
        return []  # structural validation reports those
    problems: list[tuple[str, str]] = []
    for gate_name, gate in gates.items():
        rules = gate.get("rules") if isinstance(gate, Mapping) else None
        for i, rule in enumerate(rules if isinstance(rules, list) else []):
            if not isinstance(rule, Mapping):
                continue
            where = f"gates.{gate_name}.rules.{i}"
            for key in ("metric", "relative_to"):
                name = rule.get(key)
                if isinstance(name, str) and name.startswith("val/") and name[4:] not in VALIDATION_METRICS:
                    problems.append((f"{where}.{key}", f"stage jobs do not log {name} (validation logs val/ "
                                                       f"{', '.join(sorted(VALIDATION_METRICS))})"))
                if isinstance(name, str) and name.startswith("lam/"):
                    parts = name.split("/")
                    known = (parts[1] in LATENT_ACTION_METRICS if len(parts) == 2 else
                             len(parts) == 3 and parts[1] in LATENT_ACTION_PER_EMBODIMENT)
                    if not known:
                        problems.append((f"{where}.{key}", f"the latent-action job does not log {name} (it logs lam/ "
                                                           f"{', '.join(sorted(LATENT_ACTION_METRICS))}, and "
                                                           f"probe_r2/<embodiment>)"))
                if not isinstance(name, str) or not name.startswith("eval/"):
                    continue
                parts = name.split("/")
                if len(parts) == 3 and parts[1] not in tasks:
                    problems.append((f"{where}.{key}", f"{name}: task '{parts[1]}' is not rolled out "
                                                       f"(evaluation.tasks: {', '.join(tasks) or 'none'})"))
                elif len(parts) not in (2, 3) or parts[-1] not in EVALUATION_METRICS:
                    problems.append((f"{where}.{key}", f"the evaluation does not report {name} (it reports eval/ "
                                                       f"{', '.join(sorted(EVALUATION_METRICS))})"))
            if rule.get("statistic") not in ("wilson", "clopper-pearson") or not isinstance(rule.get("metric"), str):
                continue
            per_rate_tasks = len(tasks) if rule["metric"].count("/") == 1 else 1  # eval/<rate> spans every task
            episodes = seeds * per_rate_tasks
            need = rule.get("min_episodes", 1)
            if isinstance(need, int) and episodes < need:
                problems.append((f"{where}.min_episodes", f"{rule['metric']} comes from {episodes} episodes "
                                                          f"(evaluation.seeds {seeds} x {per_rate_tasks} task(s)) "
                                                          f"< min_episodes {need}: raise evaluation.seeds"))
            threshold, confidence = rule.get("threshold"), rule.get("confidence", 0.95)
            if isinstance(threshold, (int, float)) and isinstance(confidence, float) and 0.5 < confidence < 1 \
                    and 0 <= threshold <= 1 and episodes > 0:
                best = rate_interval(episodes, episodes, confidence, rule["statistic"])[0]
                if best < threshold:
                    enough = episodes_for(threshold, confidence, rule["statistic"])
                    how = f"needs >= {enough} episodes" if enough else "no number of episodes reaches it"
                    problems.append((f"{where}.threshold", f"even {episodes}/{episodes} successes give a "
                                                           f"{confidence:.0%} {rule['statistic']} lower bound of "
                                                           f"{best:.3f} < {threshold:g}: too few episodes for that "
                                                           f"confidence ({how})"))
    return problems


# ------------------------------------------------------------------------------------------------ errors


class ConfigError(ValueError):
    """A configuration that cannot be used, with every problem found in it.

    `errors` is a list of `(key_path, message)`; the key path is dotted (`stages.stage1.lr`), or empty for
    problems with the file as a whole (missing, unreadable, YAML syntax).
    """

    def __init__(self, path: str | Path, errors: list[tuple[str, str]]):
        self.path = str(path)
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(
            f"{self.path}: {key}: {msg}" if key else f"{self.path}: {msg}" for key, msg in self.errors
        )


def _key_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _validation_errors(exc: ValidationError) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for err in exc.errors():
        if err["type"] == _CONSISTENCY_ERROR:
            errors.extend(err["ctx"]["problems"])
        else:
            errors.append((_key_path(err["loc"]), err["msg"]))
    return errors


# ------------------------------------------------------------------------------------------------ loader


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key; the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    """`line L, column C: problem (context started at line L', column C')`, lines and columns from 1."""
    mark = exc.problem_mark or exc.context_mark
    text = f"{_at(mark)}: " if mark is not None else ""
    text += exc.problem or exc.context or "invalid YAML"
    if exc.problem and exc.context:
        text += f" ({exc.context}"
        if exc.context_mark is not None and exc.context_mark is not mark:
            text += f" started at {_at(exc.context_mark)}"
        text += ")"
    return text


def _read_yaml(path: Path, shown: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(shown, [("", f"file not found: {path.resolve()}")]) from None
    except IsADirectoryError:
        raise ConfigError(shown, [("", f"is a directory, not a file: {path.resolve()}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(shown, [("", f"cannot read file: {exc}")]) from None

    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        message = _describe_yaml_error(exc)
        raise ConfigError(shown, [("", f"YAML syntax error at {message}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(shown, [("", f"YAML error: {exc}")]) from None

    if data is None:  # empty file or only comments: every default would pass, which is never what was meant
        raise ConfigError(shown, [("", "the file is empty (or only comments): start from the shipped params.yaml "
                                       "(`motus config show` prints every key with its default)")])
    if not isinstance(data, dict):
        problem = (
            f"the top level must be a mapping of sections (project, model, ...), got {type(data).__name__}"
        )
        raise ConfigError(shown, [("", problem)])
    return data


def validate_params(data: Mapping[str, Any], path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Validate already-parsed params data; raise `ConfigError` listing every problem."""
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        errors = _validation_errors(exc)
        if not any(err["type"] == _CONSISTENCY_ERROR for err in exc.errors()):
            # Structure failed, so the root validator never ran: check cross-section references on the raw
            # data too, so one run reports everything.
            errors.extend(e for e in _consistency_problems(data) if e not in errors)
        raise ConfigError(path, errors) from None


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate `params.yaml`.

    `path` defaults to `Settings.params_file` (env `MOTUS_PARAMS`, else `./params.yaml`). Raises `ConfigError`
    listing every problem with its key path.
    """
    if path is None:
        path = get_settings().params_file
    shown = str(path)
    data = _read_yaml(Path(path), shown)
    return validate_params(data, shown)


LATENT_ACTION_JOB = "latent-action"  # the latent-action VAE job: not a stage of params.yaml, a job all the same


def stage_key(params: Params, stage: str | int) -> str:
    """'3', 3 or 'stage3' -> the params.yaml key of that stage ('latent-action' stays itself): the one resolver
    the CLI, the launchers and the worker share."""
    if str(stage) == LATENT_ACTION_JOB or str(stage) in params.stages:
        return str(stage)
    matches = [k for k, s in params.stages.items() if str(s.stage) == str(stage)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"params.yaml: stages: no stage '{stage}' (stages: {', '.join(params.stages)})")
    raise ValueError(f"params.yaml: stages: stage {stage} is defined {len(matches)} times ({matches}); name one")


def resolved_dict(params: Params) -> dict[str, Any]:
    """The configuration with every default filled in, as JSON-friendly data (paths as str, tuples as lists)."""
    return params.model_dump(mode="json")


def config_hash(params: Params) -> str:
    """sha256 (hex) of the canonical JSON of the resolved configuration; independent of key order in the file."""
    canonical = json.dumps(resolved_dict(params), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------- environment


class Settings(BaseSettings):
    """Where things live on this machine. `MOTUS_*` environment variables, then `.env`, then these defaults.

    The defaults are the embedded setup: MLflow on SQLite in the project folder, the DVC remote in a local
    folder, training processes on this machine. Production sets these to a tracking server, S3 and the
    `kubernetes` launcher; switching is configuration, never code. Secrets, when any are added, must be
    `SecretStr` so they are masked wherever settings are shown (there are none yet).
    """

    model_config = SettingsConfigDict(
        env_prefix="MOTUS_", env_file=".env", extra="ignore", populate_by_name=True
    )

    params_file: Path = Field(
        DEFAULT_PARAMS_FILE,
        validation_alias=AliasChoices("MOTUS_PARAMS", "MOTUS_PARAMS_FILE"),
        description="The params file to load (MOTUS_PARAMS).",
    )
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    tracking_buffer_mb: float = Field(64.0, gt=0, description="What a job keeps in its run folder "
                                      "(tracking-buffer.jsonl and artifact copies) while the tracking store does not "
                                      "answer; beyond it points are dropped, counted and said.")
    data_remote: str = Field(".dvc-remote", description="DVC remote: a local folder or an s3:// URL.")
    dvc_cache_type: str = Field("reflink,copy", pattern=r"^(reflink|hardlink|symlink|copy)(,(reflink|hardlink|symlink|copy))*$",
                                description="How DVC puts tiers into its cache: reflink,copy (default; shares blocks "
                                "where the filesystem can) or hardlink (no copy anywhere, but a tier file rewritten "
                                "in place by root changes the cached version too).")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO etc.); None = AWS.")
    launcher: Literal["local", "kubernetes"] = Field("local", description="Where training jobs run.")
    image: str | None = Field(None, description="Training container image for the kubernetes launcher.")
    pool: str | None = Field(None, description="params.yaml pool the kubernetes launcher submits to by default.")
    k8s_poll_s: float = Field(10.0, gt=0, description="How often the kubernetes launcher reads a job's state.")
    profile: Literal["local", "production"] = Field("local", description="Which deployment this is.")
    warm_jobs: bool = Field(True, description="Local CPU jobs are forked from a warm runner that has already "
                            "imported torch, DeepSpeed, diffusers and MLflow (motus.launch.runner); false: every "
                            "job process imports them itself.")
    runner_dir: Path | None = Field(None, description="Where warm runners keep their sockets, pid files and logs "
                                    "(default: <tmp>/motus-runners-<uid>).")
    runner_idle_s: float = Field(120.0, gt=0, description="A warm runner exits after this long without jobs.")
    serve_poll_s: float = Field(5.0, gt=0, description="How often `motus serve` reads the alias it follows.")
    serve_cache_dir: Path | None = Field(None, description="Where `motus serve` keeps the exports it fetched, one "
                                         "folder per version (default: ~/.cache/motus/serve).")
    serve_device: str = Field("cpu", description="The device `motus serve` runs the model on (cpu, cuda, cuda:1).")
    serve_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="What `motus serve` computes in: auto (bf16 on CUDA, fp32 on a CPU), bf16 or fp32.")
    checkpoint_async: bool = Field(True, description="Training jobs write checkpoints in the background: the state "
                                   "is copied to host memory at the step boundary and training goes on while the "
                                   "files are written; false: the loop waits for each save.")


def settings_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """`(variable, message)` pairs for a failed `Settings()`; variables named as they are set (`MOTUS_X`)."""
    prefix = Settings.model_config.get("env_prefix", "").upper()
    errors = []
    for err in exc.errors():
        name = _key_path(err["loc"]).upper()
        errors.append((name if name.startswith(prefix) else prefix + name, err["msg"]))
    return errors


def get_settings() -> Settings:
    """The environment's settings, freshly read; raises `ConfigError` naming each bad `MOTUS_*` variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError("environment", settings_errors(exc)) from None
