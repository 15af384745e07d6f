"""The evaluate step: closed-loop rollouts of the stage's new version, recorded as an evaluation run that its
gate reads. Its output is that run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Context, Step, StepKind


class EvaluateStep(StepKind):
    kind = "evaluate"
    modules = ("motus.evaluate.run", "motus.track.evaluations")
    outputs = ("run_id", "model", "version", "metrics")

    def config(self, pipe: Context, step: Step) -> dict[str, Any]:
        return {"evaluation": pipe.evaluation, "data": {"window": pipe.resolved["data"]["window"]}}

    def run(self, pipe: Context, step: Step, key: str) -> dict[str, Any]:
        from ...evaluate import evaluate_model
        from ...track.evaluations import record_evaluation

        out = pipe.dep_output(step, "stage")
        ev = pipe.evaluation
        seeds = list(range(int(ev["first_seed"]), int(ev["first_seed"]) + int(ev["seeds"])))
        report = evaluate_model(pipe.params, pipe.model_export(out), model_name=out["model"],
                                version=int(out["version"]), seeds=seeds, tasks=list(ev["tasks"]),
                                max_steps=int(ev["max_steps"]), video_episodes=int(ev["video_episodes"]),
                                windows_per_tier=int(ev["windows_per_tier"]), draws=int(ev["draws"]),
                                workers=ev.get("workers"), progress=False, echo=pipe.echo)
        record_evaluation(report, tracking_uri=pipe.tracking_uri, experiment=pipe.params.project.name)
        keep = {k: v for k, v in report.metrics.items() if k.count("/") == 1}
        return {"run_id": report.run_id, "model": out["model"], "version": int(out["version"]), "metrics": keep}

    def still_there(self, pipe: Context, step: Step, out: Mapping[str, Any], repair: bool) -> bool:
        try:
            pipe.ledger.client.get_run(out["run_id"])
        except Exception:  # noqa: BLE001 - a run that cannot be read is not reusable: evaluate again
            return False
        return True

    def as_input(self, out: Mapping[str, Any]) -> str | None:
        return out["run_id"]

    def describe(self, out: Mapping[str, Any]) -> str:
        return f"evaluation run {out['run_id'][:12]}"
