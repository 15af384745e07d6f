"""The track room: MLflow runs (params, metrics, datasets, artifacts, system metrics) and run accounting."""

from motus.track.accounting import cost, device_hours, git_state
from motus.track.tracker import MlflowTracker, ParamConflictError

__all__ = ["MlflowTracker", "ParamConflictError", "cost", "device_hours", "git_state"]
