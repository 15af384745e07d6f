"""Tokens per sample that one training forward of each stage runs on: the one set of rules the memory estimate
(`motus.train.memory`), the FLOP count (`benchmarks/mot_flops.py`) and `motus model info` share.

  video          latent_frames * (latent_h / patch_h) * (latent_w / patch_w)
  action         finetune (Stage 3): 1 state + chunk actions + registers; pretrain (Stage 2): chunk latent actions
  understanding  the frozen VLM's sequence: image tokens after the 2x2 merger + 2 vision markers + the
                 instruction's tokens (a stated number: it depends on the instruction and the chat template)
  text           text_len T5 tokens (zero-padded to exactly this length)
Stage 1 runs the video expert alone (no action or understanding tokens); Stages 2 and 3 run all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .presets import MotusConfig

STAGES = (1, 2, 3)
DEFAULT_INSTRUCTION_TOKENS = 32
VISION_SPECIAL_TOKENS = 2  # <vision_start> and <vision_end> around the image tokens


@dataclass(frozen=True)
class Tokens:
    video: int
    action: int
    understanding: int
    text: int

    @property
    def joint(self) -> int:
        """Length of the joint attention sequence: every present expert's tokens, concatenated."""
        return self.video + self.action + self.understanding


def check_stage(stage: int) -> int:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    return int(stage)


def encoder_mode_for(stage: int) -> str | None:
    """The action encoder's mode each stage trains with (None: Stage 1 feeds no action tokens)."""
    return {1: None, 2: "pretrain", 3: "finetune"}[check_stage(stage)]


def vlm_image_side(cfg: MotusConfig) -> int:
    """Side of the square the Qwen-VL processor resizes the conditioning frame to (min_pixels = max_pixels =
    vlm_image_size^2): the nearest multiple of patch * merge that keeps the area."""
    vc = cfg.vlm["vision_config"]
    f = int(vc["patch_size"]) * int(vc["spatial_merge_size"])
    s = int(cfg.vlm_image_size)
    side = max(f, round(s / f) * f)
    if side > s:
        side = max(f, (s // f) * f)
    elif side < s:
        side = math.ceil(s / f) * f
    return side


def vlm_image_tokens(cfg: MotusConfig) -> int:
    vc = cfg.vlm["vision_config"]
    return (vlm_image_side(cfg) // (int(vc["patch_size"]) * int(vc["spatial_merge_size"]))) ** 2


def understanding_tokens(cfg: MotusConfig, instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS) -> int:
    return vlm_image_tokens(cfg) + VISION_SPECIAL_TOKENS + int(instruction_tokens)


def video_tokens(cfg: MotusConfig) -> int:
    pt, ph, pw = (int(p) for p in cfg.video["patch_size"])
    h, w = cfg.latent_hw
    return (cfg.latent_frames // pt) * (h // ph) * (w // pw)


def action_tokens(cfg: MotusConfig, mode: str) -> int:
    a = cfg.action
    if mode == "finetune":
        return 1 + a.chunk + a.num_registers
    if mode == "pretrain":
        return a.chunk
    raise ValueError(f"unknown action encoder mode '{mode}'; expected 'finetune' or 'pretrain'")


def stage_tokens(cfg: MotusConfig, stage: int, instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS) -> Tokens:
    mode = encoder_mode_for(stage)
    if mode is None:
        return Tokens(video_tokens(cfg), 0, 0, int(cfg.text_len))
    return Tokens(video_tokens(cfg), action_tokens(cfg, mode), understanding_tokens(cfg, instruction_tokens),
                  int(cfg.text_len))
