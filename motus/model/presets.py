"""Model configuration and the two presets.

`tiny` trains on a laptop CPU in seconds (tests, demo); `full` has the paper's sizes (Wan2.2-TI2V-5B video
expert, 30x1024 action expert, 30x512 understanding expert, Qwen3-VL-2B) and loads real weights from local
paths. A `MotusConfig` is plain data: it round-trips through JSON so a checkpoint says how to rebuild itself.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

EncoderMode = Literal["finetune", "pretrain"]


@dataclass
class ActionExpertConfig:
    dim: int = 1024
    ffn_dim: int = 4096
    num_layers: int = 30
    action_dim: int = 14
    state_dim: int = 14
    chunk: int = 16  # actions per sample (K); the paper runs actions at 6x the video frame rate
    num_registers: int = 4
    encoder_mode: EncoderMode = "finetune"  # finetune: [state, a_1..a_K, registers]; pretrain: [a_1..a_K]
    freq_dim: int = 256
    eps: float = 1e-6


@dataclass
class UnderstandingExpertConfig:
    dim: int = 512
    ffn_dim: int = 2048
    num_layers: int = 30
    vlm_hidden: int = 2048  # Qwen3-VL-2B text hidden size
    adapter_depth: int = 3  # Linear + (SiLU, Linear) x (depth-1)
    eps: float = 1e-5


@dataclass
class FlowConfig:
    """Rectified flow with one timestep per modality (UniDiffuser style)."""

    timestep_sampler: Literal["uniform_shift", "logit_normal"] = "uniform_shift"
    shift: float = 5.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    video_loss_weight: float = 1.0
    action_loss_weight: float = 1.0
    inference_steps: int = 10
    inference_shift: float = 5.0


@dataclass(frozen=True)
class Geometry:
    """What one training sample spans, as the official configs set it (one name per setting).

    num_frames pixel frames (1 condition + future, 1 + 4k for the Wan VAE's temporal stride 4) at height x width;
    `chunk` actions at the control rate, `downsample` stored frames apart; so `chunk / (num_frames - 1)` actions
    fall between two future frames (the video/action ratio: action-dense, video-sparse).
    """

    name: str
    num_frames: int
    height: int
    width: int
    chunk: int
    downsample: int

    @property
    def ratio(self) -> int:
        return self.chunk // (self.num_frames - 1)


GEOMETRIES: dict[str, Geometry] = {
    # official RoboTwin config: 1 + 8 frames (3 latent frames), 16 actions, ratio 2, every 3rd stored frame
    "robotwin": Geometry("robotwin", num_frames=9, height=384, width=320, chunk=16, downsample=3),
    # official AC-One / Agilex / LeRobot configs: the same frames, 48 actions at every stored frame, ratio 6
    "ac-one": Geometry("ac-one", num_frames=9, height=384, width=320, chunk=48, downsample=1),
    # the CPU preset: 1 + 4 frames (2 latent frames) at 64x64, 8 actions, ratio 2
    "tiny": Geometry("tiny", num_frames=5, height=64, width=64, chunk=8, downsample=3),
}


def geometry_names() -> list[str]:
    return sorted(GEOMETRIES)


@dataclass
class MotusConfig:
    preset: str
    # diffusers WanTransformer3DModel / AutoencoderKLWan constructor arguments, verbatim.
    video: dict[str, Any]
    vae: dict[str, Any]
    # transformers Qwen3VLConfig arguments (text_config / vision_config / token ids).
    vlm: dict[str, Any]
    action: ActionExpertConfig = field(default_factory=ActionExpertConfig)
    understanding: UnderstandingExpertConfig = field(default_factory=UnderstandingExpertConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    # Pixel geometry of one training sample: 1 conditioning frame + future frames (1 + 4k for the Wan VAE).
    num_frames: int = 5
    height: int = 64
    width: int = 64
    vlm_image_size: int = 64  # the VLM sees the conditioning frame resized to this square
    # The geometry these sizes came from (a GEOMETRIES name, or "custom" once a size is overridden) and the
    # stored frames between consecutive actions it trains with: the window loader and the closed loop read it.
    geometry: str = "custom"
    downsample: int = 3
    # T5 context length: every instruction is zero-padded (or cut) to exactly this many tokens, as Wan 2.2 was
    # trained (512). A fixed length keeps a sample's prediction independent of what it is batched with.
    text_len: int = 512
    # Local pretrained weights (never downloaded). None = random init (fine for tiny, refused for full).
    weights: dict[str, str | None] = field(
        default_factory=lambda: {"video": None, "vae": None, "vlm": None, "text": None})

    # --- derived geometry -------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.video["in_channels"])

    @property
    def latent_frames(self) -> int:
        return 1 + (self.num_frames - 1) // int(self.vae["scale_factor_temporal"])

    @property
    def video_action_ratio(self) -> int:
        return self.action.chunk // (self.num_frames - 1)

    def apply_geometry(self, name: str) -> MotusConfig:
        """Set frames, image size, chunk and downsample from a named geometry (in place; returns self)."""
        if name not in GEOMETRIES:
            raise ValueError(f"unknown geometry '{name}'; expected one of {geometry_names()}")
        g = GEOMETRIES[name]
        self.num_frames, self.height, self.width = g.num_frames, g.height, g.width
        self.action.chunk, self.downsample, self.geometry = g.chunk, g.downsample, g.name
        return self

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = int(self.vae["scale_factor_spatial"])
        return self.height // s, self.width // s

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.latent_channels, self.latent_frames, *self.latent_hw)

    @property
    def joint_heads(self) -> int:
        return int(self.video["num_attention_heads"])

    @property
    def joint_head_dim(self) -> int:
        return int(self.video["attention_head_dim"])

    @property
    def num_layers(self) -> int:
        return int(self.video["num_layers"])

    def validate(self) -> None:
        """Catch inconsistent sizes here, with the expected value named, not as a shape error deep inside."""
        errors = []
        for name, n in (("action.num_layers", self.action.num_layers),
                        ("understanding.num_layers", self.understanding.num_layers)):
            if n != self.num_layers:
                errors.append(f"{name}={n} must equal video.num_layers={self.num_layers} (one joint attention per layer)")
        st, ss = int(self.vae["scale_factor_temporal"]), int(self.vae["scale_factor_spatial"])
        if (self.num_frames - 1) % st != 0 or self.num_frames < 1 + st:
            errors.append(f"num_frames={self.num_frames} must be 1 + {st}*k with k >= 1 (Wan VAE temporal stride)")
        p = self.video["patch_size"]
        for name, size in (("height", self.height), ("width", self.width)):
            if size % (ss * p[1]) != 0:
                errors.append(f"{name}={size} must be a multiple of {ss * p[1]} (VAE stride {ss} x patch {p[1]})")
        if self.vae["z_dim"] != self.video["in_channels"]:
            errors.append(f"vae.z_dim={self.vae['z_dim']} must equal video.in_channels={self.video['in_channels']}")
        text_hidden = self.vlm["text_config"]["hidden_size"]
        if self.understanding.vlm_hidden != text_hidden:
            errors.append(f"understanding.vlm_hidden={self.understanding.vlm_hidden} must equal the VLM hidden size {text_hidden}")
        if self.action.chunk < 1:
            errors.append(f"action.chunk={self.action.chunk} must be >= 1")
        elif self.num_frames > 1 and self.action.chunk % (self.num_frames - 1):
            errors.append(f"action.chunk={self.action.chunk} must be a multiple of the {self.num_frames - 1} future "
                          f"frames (num_frames - 1), so each future frame has the same number of actions")
        if self.text_len < 1:
            errors.append(f"text_len={self.text_len} must be >= 1")
        if self.downsample < 1:
            errors.append(f"downsample={self.downsample} must be >= 1")
        if errors:
            raise ValueError("invalid Motus model config:\n  " + "\n  ".join(errors))

    # --- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MotusConfig:
        d = copy.deepcopy(d)
        sub = {"action": ActionExpertConfig, "understanding": UnderstandingExpertConfig, "flow": FlowConfig}
        for key, typ in sub.items():
            if key in d and isinstance(d[key], dict):
                known = {f.name for f in dataclasses.fields(typ)}
                unknown = set(d[key]) - known
                if unknown:
                    raise ValueError(f"unknown keys in model config section '{key}': {sorted(unknown)}")
                d[key] = typ(**d[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown keys in model config: {sorted(unknown)}")
        return cls(**d)


def _wan22_vae(z_dim: int, base_dim: int, decoder_base_dim: int, dim_mult: list[int], num_res_blocks: int) -> dict:
    return dict(
        base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=z_dim, dim_mult=dim_mult,
        num_res_blocks=num_res_blocks, temperal_downsample=[False, True, True], is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )


def tiny() -> MotusConfig:
    """A few layers, small widths, 64x64 pixels: one train step is milliseconds on a CPU."""
    layers, heads, head_dim = 2, 2, 16
    return MotusConfig(
        preset="tiny",
        video=dict(
            patch_size=[1, 2, 2], num_attention_heads=heads, attention_head_dim=head_dim, in_channels=8,
            out_channels=8, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
        ),
        vae=_wan22_vae(z_dim=8, base_dim=8, decoder_base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
        vlm=dict(
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=512, max_position_embeddings=512,
                rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True},
            ),
            vision_config=dict(
                depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                num_position_embeddings=64,
            ),
            image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
        ),
        action=ActionExpertConfig(dim=32, ffn_dim=64, num_layers=layers, chunk=8, num_registers=4),
        understanding=UnderstandingExpertConfig(dim=16, ffn_dim=32, num_layers=layers, vlm_hidden=32),
        flow=FlowConfig(inference_steps=4),
        vlm_image_size=64, text_len=96,  # byte-level stand-in: 96 bytes hold every shipped instruction
    ).apply_geometry("tiny")


def full() -> MotusConfig:
    """The paper's sizes: Wan2.2-TI2V-5B + Wan 2.2 VAE, action 30x1024, understanding 30x512, Qwen3-VL-2B."""
    return MotusConfig(
        preset="full",
        video=dict(
            patch_size=[1, 2, 2], num_attention_heads=24, attention_head_dim=128, in_channels=48,
            out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        vae=_wan22_vae(z_dim=48, base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
        vlm=dict(
            text_config=dict(
                hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                tie_word_embeddings=True, rope_theta=5000000.0,
                rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
            ),
            vision_config=dict(
                depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                deepstack_visual_indexes=[5, 11, 17], num_position_embeddings=2304,
            ),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
            vision_end_token_id=151653, tie_word_embeddings=True,
        ),
        action=ActionExpertConfig(dim=1024, ffn_dim=4096, num_layers=30, chunk=16, num_registers=4),
        understanding=UnderstandingExpertConfig(dim=512, ffn_dim=2048, num_layers=30, vlm_hidden=2048),
        flow=FlowConfig(inference_steps=10),
        vlm_image_size=384, text_len=512,
    ).apply_geometry("robotwin")


def small() -> MotusConfig:
    """Between the two: 4 layers, 128-wide joint attention, 128x128 pixels. For benchmarks and GPU smoke runs."""
    cfg = tiny()
    cfg.preset = "small"
    cfg.video.update(num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4, text_dim=64, freq_dim=64)
    cfg.action = ActionExpertConfig(dim=128, ffn_dim=512, num_layers=4, chunk=16, num_registers=4)
    cfg.understanding = UnderstandingExpertConfig(dim=64, ffn_dim=256, num_layers=4, vlm_hidden=32)
    cfg.height = cfg.width = 128
    cfg.geometry = "custom"
    return cfg


PRESETS = {"tiny": tiny, "small": small, "full": full}


def _merge(base: Any, override: Any, path: str) -> Any:
    if dataclasses.is_dataclass(base):
        names = {f.name for f in dataclasses.fields(base)}
        if not isinstance(override, dict):
            raise ValueError(f"model override '{path}' must be a mapping")
        for k, v in override.items():
            if k not in names:
                raise ValueError(f"unknown model override '{path}.{k}'".replace("'.", "'"))
            setattr(base, k, _merge(getattr(base, k), v, f"{path}.{k}"))
        return base
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base[k], v, f"{path}.{k}") if k in base else v
        return out
    return override


def build_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> MotusConfig:
    """A preset with dotted-path-free nested overrides applied, validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}'; expected one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    if overrides:
        cfg = _merge(cfg, overrides, "")
    cfg.validate()
    return cfg


def config_from_params(section: Any) -> MotusConfig:
    """The `model:` section of params.yaml (a `motus.config.ModelConfig`) -> a validated MotusConfig.

    The named geometry first, then named fields (action_dim, chunk, frames, weights, flow), then free-form
    `overrides`. A chunk or frame count that differs from the geometry's makes the geometry "custom".
    """
    cfg = PRESETS[section.preset]() if section.preset in PRESETS else build_config(section.preset)
    cfg.action.action_dim = section.action_dim
    cfg.action.state_dim = section.state_dim
    if section.geometry is not None:
        cfg.apply_geometry(section.geometry)
    if section.action_chunk is not None and section.action_chunk != cfg.action.chunk:
        cfg.action.chunk, cfg.geometry = section.action_chunk, "custom"
    if section.num_video_frames is not None and section.num_video_frames != cfg.num_frames:
        cfg.num_frames, cfg.geometry = section.num_video_frames, "custom"
    cfg.weights = {k: (str(v) if v is not None else None) for k, v in section.weights.model_dump().items()}
    for k, v in section.flow.model_dump().items():
        setattr(cfg.flow, k, v)
    cfg.flow.inference_shift = section.flow.shift
    if section.overrides:
        cfg = _merge(cfg, section.overrides, "")
    cfg.validate()
    return cfg
