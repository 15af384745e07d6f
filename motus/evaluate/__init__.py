"""The evaluate room: every Motus mode measured on held-out data and in closed loop, beside floors and ceilings.

`evaluate_model(params, export_dir, ...)` -> `EvaluationReport`; see `motus.evaluate.run` for the metric names.
"""

from motus.evaluate.report import EvaluationReport
from motus.evaluate.run import DEFAULT_SEEDS, DEFAULT_TASKS, FIRST_SEED, MODES, evaluate_model

__all__ = ["DEFAULT_SEEDS", "DEFAULT_TASKS", "FIRST_SEED", "MODES", "EvaluationReport", "evaluate_model"]
