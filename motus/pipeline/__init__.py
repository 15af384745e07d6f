"""The pipeline room: the recipe as content-addressed steps, planned and run (flows/pipeline.py schedules it)."""

from .pipeline import (
    GateFailed,
    InfrastructureError,
    Pipeline,
    PipelineError,
    build_steps,
    is_infrastructure_error,
)

__all__ = ["GateFailed", "InfrastructureError", "Pipeline", "PipelineError", "build_steps", "is_infrastructure_error"]
