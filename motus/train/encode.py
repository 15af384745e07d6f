"""Build a tier's encoder cache (`motus.data.encoded`) with the encoders and window geometry its stages use.

One cache per tier serves every stage reading it: the frozen encoders and the window geometry are the
project's, not a stage's. It carries the VLM's features when any stage reading the tier uses the
understanding expert (Stage 2 on); a Stage 1-only tier is not run through the VLM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.encoded import FEATURE, build_encoded, cache_key, miss_reason
from ..data.loader import TierWindows, window_spec_from_params
from ..data.paths import ProjectPaths
from ..data.tier import Tier
from ..model.encoders import FrozenEncoders
from .recipe import model_config_for, recipe_from_params

log = logging.getLogger("motus.train")


@dataclass
class EncodePlan:
    tier: Tier
    path: Path
    key: dict[str, Any]
    spec: Any
    cfg: Any
    encoders: FrozenEncoders
    stages: list[str]


def readers_of(params: Any, tier: str) -> list[Any]:
    """The stage recipes that read `tier`, in stage order."""
    recipes = [recipe_from_params(params, k) for k in params.stages]
    return sorted((r for r in recipes if tier in r.tiers), key=lambda r: r.stage)


def encode_plan(params: Any, tier_name: str, root: Path | None = None, device: str = "cpu") -> EncodePlan:
    """What `tier_name`'s cache must be: its key, built from the encoders its stages load."""
    readers = readers_of(params, tier_name)
    if not readers:
        raise ValueError(f"tier '{tier_name}' is read by no stage: nothing would read its encoder cache")
    paths = ProjectPaths.of(params, root)
    tier = Tier(paths.tier(tier_name))
    cfg = model_config_for(params, readers[0])
    spec = window_spec_from_params(params.data.window, cfg, cfg.action.action_dim, cfg.action.state_dim)
    encoders = FrozenEncoders.build(cfg, params.project.seed, device,
                                    with_vlm=any(r.uses_understanding for r in readers))
    return EncodePlan(tier, paths.feature(FEATURE, tier_name), cache_key(tier, spec, cfg, encoders), spec, cfg,
                      encoders, [r.name for r in readers])


def encode_tier(params: Any, tier_name: str, *, root: Path | None = None, batch: int = 8, force: bool = False,
                progress: Callable[[int, int], None] | None = None) -> tuple[Any, str]:
    """Build (or keep) `tier_name`'s encoder cache. Returns (its manifest, what was done and why)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = encode_plan(params, tier_name, root, device)
    why = miss_reason(plan.path, plan.key, verify=True)
    if why is None and not force:
        from ..data.features import Feature

        return Feature(plan.path).manifest, "up to date"
    windows = TierWindows(plan.tier, plan.spec, split="all", heldout_fraction=params.data.heldout_fraction,
                          cache_size=1)
    log.info("encoding tier '%s' for %s (%s)", tier_name, ", ".join(plan.stages), why or "forced")
    manifest = build_encoded(plan.tier, windows, plan.encoders, plan.key, plan.path,
                             vlm_image_size=plan.cfg.vlm_image_size, batch=batch, progress=progress)
    return manifest, f"built ({why or 'forced'})"
