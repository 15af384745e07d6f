"""How a pipeline step fails: deterministically (the recipe, the config, a gate) or by the machinery (retryable)."""

from __future__ import annotations


class PipelineError(Exception):
    """A deterministic failure: retrying will not help (bad config, a failed gate, a job that raised)."""


class GateFailed(PipelineError):
    """A candidate did not pass its gate; the message names every failing rule."""


class InfrastructureError(Exception):
    """A failure of the machinery, not of the recipe (a job killed from outside, a lost connection): retryable."""


def is_infrastructure_error(exc: BaseException | None) -> bool:
    if exc is None or isinstance(exc, PipelineError):
        return False
    if isinstance(exc, (InfrastructureError, ConnectionError, TimeoutError)):
        return True
    # requests / botocore connection failures without importing either
    return type(exc).__name__ in {"ConnectionError", "EndpointConnectionError", "ConnectTimeout", "ReadTimeout"}
