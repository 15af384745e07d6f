"""Where a project keeps its data: one value, so every room agrees (tiers under `data.root`, features beside
them), whatever folder a process starts in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .features import feature_dir


@dataclass(frozen=True)
class ProjectPaths:
    root: Path  # the project folder: params.yaml, dvc.yaml, dvc.lock
    data_root: Path  # params.yaml `data.root`, relative to `root` unless absolute

    @classmethod
    def of(cls, params: Any, root: Path | None = None) -> ProjectPaths:
        """Paths of the project whose params these are; `root` defaults to the current folder (where the CLI,
        the DVC stages and the training jobs run)."""
        return cls(Path(root) if root is not None else Path("."), Path(params.data.root))

    @property
    def tiers(self) -> Path:
        return self.data_root if self.data_root.is_absolute() else self.root / self.data_root

    def tier(self, name: str) -> Path:
        return self.tiers / name

    @property
    def features(self) -> Path:
        return self.tiers.parent / "features"

    def feature(self, kind: str, tier: str) -> Path:
        return feature_dir(self.features, kind, tier)

    @property
    def latent_action_model(self) -> Path:
        """The latent-action VAE export the `latent-actions` DVC stages read (dvc.yaml names this path)."""
        return self.root / "models" / "latent-action"
