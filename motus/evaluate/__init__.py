"""The evaluate room: every Motus mode measured on held-out data and in closed loop, beside floors and ceilings.

`evaluate_model(params, export_dir, ...)` -> `EvaluationReport`; see `motus.evaluate.run` for the metric names.
The names below are imported on first use: reading a report (`motus.evaluate.report`, e.g. by the track room
recording one) must not pay for the model, the simulators and diffusers.
"""

from typing import Any

__all__ = ["DEFAULT_SEEDS", "DEFAULT_TASKS", "FIRST_SEED", "MODES", "EvaluationReport", "evaluate_model"]


def __getattr__(name: str) -> Any:
    if name == "EvaluationReport":
        from motus.evaluate.report import EvaluationReport

        return EvaluationReport
    if name in __all__:
        from motus.evaluate import run

        return getattr(run, name)
    raise AttributeError(f"module 'motus.evaluate' has no attribute {name!r}")
