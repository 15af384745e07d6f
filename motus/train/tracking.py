"""What the training loop reports, and to whom: a `Tracker` (MLflow lives in `motus.track`).

The train room must not import the track room (rooms import only leftwards), so the loop talks to this
protocol; the launcher hands it an `motus.track.MlflowTracker` on rank 0 and a `NullTracker` elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None:
        """Nested dict; flattened to dotted keys by the tracker."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training",
                    extra: dict[str, Any] | None = None) -> None:
        """A tier used as an input: `digest` is its tier hash (DVC hash when versioned, else content hash)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_image(self, image: np.ndarray, name: str) -> None:
        """uint8 [H, W, 3] -> a PNG artifact."""

    def log_loss_curve(self, history: dict[str, list[tuple[int, float]]], name: str = "loss_curve.png") -> None:
        """Series name -> [(step, value)] -> one PNG artifact."""

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None: ...


class NullTracker:
    """Every rank but 0 (and `--no-track`): reports nothing."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training",
                    extra: dict[str, Any] | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_image(self, image: np.ndarray, name: str) -> None:
        pass

    def log_loss_curve(self, history: dict[str, list[tuple[int, float]]], name: str = "loss_curve.png") -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        pass
