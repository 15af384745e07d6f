"""The job spec lives in `motus.contracts` (it crosses from the CLI and the pipeline into every launcher and
the worker); this name stays for one release."""

from ..contracts import JobSpec

__all__ = ["JobSpec"]
