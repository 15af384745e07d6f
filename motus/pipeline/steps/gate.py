"""The gate step: the version its stage (or that stage's evaluation) produced is judged under the model's gate
and, when every rule passes, promoted to champion. Never cached: a promotion is decided on the registry as it
is now. Its output is the champion a dependent stage starts from, and only a champion its audit trail agrees
with: one moved outside the platform stops the pipeline (a deterministic failure naming the repair), so no stage
is judged against it or trained on it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import GateFailed, PipelineError
from .base import Context, Step, StepKind


def champion(pipe: Context, step: Step) -> Any:
    """The audited champion of the step's model (None: none yet); PipelineError when the alias is unverified."""
    from ...track.registry import UnverifiedAlias

    try:
        return pipe.registry.champion(step.target)
    except UnverifiedAlias as e:
        raise PipelineError(f"{step.name}: {e}") from None


class GateStep(StepKind):
    kind = "gate"
    outputs = ("champion", "verdict")
    cached = False

    @staticmethod
    def version(pipe: Context, step: Step) -> int:
        """The version the gate decides on: its stage's (or that stage's evaluation's) output."""
        return int(pipe.outputs[step.deps[0]]["version"])

    def run(self, pipe: Context, step: Step, key: str | None = None) -> dict[str, Any]:
        version = self.version(pipe, step)
        model = step.target
        champ = champion(pipe, step)
        if champ is not None and int(champ.version) == version:
            pipe.echo(f"[{step.name}] v{version} is already champion")
            return {"champion": version, "verdict": "champion"}
        verdict = pipe.registry.evaluate(model, version)
        if not verdict.passed:
            raise GateFailed(f"{model} v{version} did not pass its gate: {verdict_reasons(verdict)}")
        pipe.registry.promote(model, version, actor=f"pipeline {pipe.pipeline_run}")
        pipe.echo(f"[{step.name}] v{version} passed every rule and is now champion")
        return {"champion": version, "verdict": "pass"}

    def plan(self, pipe: Context, step: Step) -> tuple[str, str, dict[str, Any] | None]:
        """(action, why, outputs when already decided) without deciding anything."""
        if step.deps[0] not in pipe.outputs:
            return "run", f"after {step.deps[0]}", None
        version = self.version(pipe, step)
        try:
            champ = champion(pipe, step)
        except PipelineError as e:  # the plan says what the run would refuse
            return "check", f"will refuse: {e}", None
        if champ is not None and int(champ.version) == version:
            return "cached", f"v{version} is already champion", {"champion": version, "verdict": "champion"}
        now = f" (champion now v{champ.version})" if champ else " (no champion yet)"
        return "check", f"decide on v{version}{now}", None

    def current(self, pipe: Context, step: Step) -> dict[str, Any]:
        """The gate's output as the registry has it now (`--from` a later step)."""
        champ = champion(pipe, step)
        return {"champion": None if champ is None else int(champ.version)}

    def ready(self, out: Mapping[str, Any]) -> bool:
        return out.get("champion") is not None

    def as_parent(self, step: Step, out: Mapping[str, Any]) -> str | None:
        return f"{step.target}/{out['champion']}"


def verdict_reasons(verdict: Any) -> str:
    """The failing rules of a verdict, each with its label (metric and bound) and reason."""
    failing = [f"{r.label}: {r.reason}" for r in verdict.rules if not r.passed]
    return "; ".join(failing) or verdict.summary()
