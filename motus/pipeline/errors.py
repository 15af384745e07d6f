"""How a pipeline step fails: deterministically (the recipe, the config, a gate) or by the machinery (retryable)."""

from __future__ import annotations

import re


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
    if getattr(exc, "transient", False):  # a cluster API that was unreachable or answered 429/5xx
        return True
    # requests / botocore connection failures without importing either
    return type(exc).__name__ in {"ConnectionError", "EndpointConnectionError", "ConnectTimeout", "ReadTimeout"}


def failure_signature(exc: BaseException) -> str:
    """What a failure says with its numbers and ids blanked: two evictions of the same job read the same even
    when their pods, times and exit codes differ."""
    return re.sub(r"\b[0-9a-f]{8,}\b|\d+(?:\.\d+)?", "#", f"{type(exc).__name__}: {exc}")


class RetryGuard:
    """Whether a failed step is tried again: only infrastructure failures, and never one that just happened the
    same way twice in a row (a pool that evicts the job every time, an image that cannot be pulled): a third try
    would spend the same device-hours to learn nothing new."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def retry(self, attempt_of: str, exc: BaseException) -> tuple[bool, str]:
        """(retry?, why) for the failure `exc` of the step run `attempt_of` (its id, the same across tries)."""
        if not is_infrastructure_error(exc):
            return False, "not an infrastructure failure: it would fail the same way again"
        sig = failure_signature(exc)
        repeated = self._last.get(attempt_of) == sig
        self._last[attempt_of] = sig
        if repeated:
            return False, "failed the same way twice in a row; not retrying a third time"
        return True, "infrastructure failure; retrying"
