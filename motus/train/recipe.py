"""Stage recipes: what a stage trains, on which tiers, with which actions, starting from what.

The paper's Table 1, as data read from `params.yaml`:
  Stage 1  levels 2, 3, 5   video expert only, video loss only (no action or understanding tokens)
  Stage 2  levels 2-5       all experts, LATENT actions, action encoder in pretrain mode, VLM frozen
  Stage 3  level 6          all experts, real actions + state, starts from Stage 2 minus action I/O layers
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import stage_key
from ..data.paths import ProjectPaths
from ..model.presets import MotusConfig, config_from_params


class StageNotReady(Exception):
    """A stage cannot start yet (missing input); the message says what produces it."""


@dataclass
class StageRecipe:
    name: str
    stage: int
    tiers: dict[str, float]
    trains: list[str]
    action_source: str  # none | latent | real
    parent: str | None
    settings: Any  # the motus.config.Stage section

    @property
    def uses_actions(self) -> bool:
        return self.action_source != "none"

    @property
    def uses_understanding(self) -> bool:
        # Stage 1 is the video generation model alone: the understanding expert joins from Stage 2 on.
        return self.stage != 1

    @property
    def encoder_mode(self) -> str:
        return "pretrain" if self.action_source == "latent" else "finetune"

    @property
    def drops_action_io(self) -> bool:
        """Stage 3 reuses the Stage 2 trunk; the action input/output layers change meaning and are re-initialised."""
        return self.action_source == "real"


def recipe_from_params(params: Any, stage: str | int) -> StageRecipe:
    key = stage_key(params, stage)
    s = params.stages[key]
    return StageRecipe(name=key, stage=s.stage, tiers=dict(s.tiers), trains=list(s.trains),
                       action_source=s.action_source, parent=s.parent, settings=s)


def model_config_for(params: Any, recipe: StageRecipe) -> MotusConfig:
    cfg = config_from_params(params.model)
    cfg.action.encoder_mode = recipe.encoder_mode
    if recipe.stage == 1:
        cfg.flow.action_loss_weight = 0.0  # video loss only; no action tokens are fed either
    return cfg


def check_ready(params: Any, recipe: StageRecipe, data_root: Path) -> None:
    """Refuse, with what to run, when an input the stage needs does not exist yet. Never fake it."""
    missing = [t for t in recipe.tiers if not (data_root / t / "manifest.json").exists()]
    if missing:
        raise StageNotReady(f"{recipe.name}: tier(s) {missing} are not built under {data_root}; "
                            f"run `motus data ingest {' '.join(missing)}` (or `motus data version`)")
    if recipe.action_source == "latent":
        features = ProjectPaths(Path("."), data_root)
        lacking = [t for t in recipe.tiers if not (features.feature("latent_actions", t) / "manifest.json").exists()]
        if lacking:
            raise StageNotReady(
                f"{recipe.name} trains on latent actions, which the latent-action VAE produces "
                f"(`motus latent-action train` then `motus latent-action export`); none exist yet for {lacking}. "
                f"Refusing to start: Stage 2 never trains on fake actions.")
    if recipe.action_source == "real":
        unlabelled = [t for t in recipe.tiers if params.tiers[t].action_dim is None]
        if unlabelled:
            raise StageNotReady(f"{recipe.name} trains on real actions but tier(s) {unlabelled} have none")


def lr_lambda(settings: Any):
    """Linear warm-up to 1, then cosine/linear decay to min_lr_ratio (or constant), as a LambdaLR factor."""
    warm, total, floor, kind = settings.warmup_steps, settings.steps, settings.min_lr_ratio, settings.schedule

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant" or total <= warm:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
