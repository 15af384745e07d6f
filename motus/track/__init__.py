"""The track room: MLflow runs (params, metrics, datasets, artifacts, system metrics) and run accounting.

`MlflowTracker` is imported on first use: a job that runs without tracking (a GPU node without mlflow, say)
still reads its code state and device hours from `motus.track.accounting`.
"""

from typing import Any

from motus.track.accounting import cost, device_hours, git_state

__all__ = ["MlflowTracker", "ParamConflictError", "cost", "device_hours", "git_state"]


def __getattr__(name: str) -> Any:
    if name in ("MlflowTracker", "ParamConflictError"):
        from motus.track import tracker

        return getattr(tracker, name)
    raise AttributeError(f"module 'motus.track' has no attribute {name!r}")
