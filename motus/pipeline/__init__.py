"""The pipeline room: the recipe as content-addressed steps, planned and run (flows/pipeline.py schedules it)."""

from .errors import GateFailed, InfrastructureError, PipelineError, is_infrastructure_error
from .pipeline import Pipeline
from .steps import build_steps

__all__ = ["GateFailed", "InfrastructureError", "Pipeline", "PipelineError", "build_steps", "is_infrastructure_error"]
