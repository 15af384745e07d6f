"""Recording an evaluation: one MLflow evaluation run per report, linked to the registered model version.

The evaluate room measures and returns an `EvaluationReport`; this module writes it down: tags, parameters,
metrics, `report.json`, rollout videos and the world-model frame strip as the run's artifacts, and the version's
`motus.evaluation_run` tag, which the gates read metrics from first.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluate.report import EvaluationReport

EVALUATION_RUN_TAG = "motus.evaluation_run"
ENVIRONMENT_TAG = "motus.evaluation.environment"  # JSON: seeds, tasks, tiers, package versions (the verdict copies it)
RUN_KIND_TAG = "motus.run_kind"


def record_evaluation(report: EvaluationReport, *, tracking_uri: str | None = None, experiment: str | None = None,
                      tracker: Any = None, training_run: str | None = None) -> str:
    """Record the report as an evaluation run (in an open `tracker`, or a new run in `experiment` at
    `tracking_uri`); with the report's model name and version, tag that version with the run. Returns the
    run id (also set on the report). `training_run`: default, the run the report's lineage names."""
    training_run = training_run or (report.lineage or {}).get("run_id")
    if tracker is None:
        from .tracker import MlflowTracker

        if tracking_uri is None or experiment is None:
            raise ValueError("record_evaluation needs an open tracker, or tracking_uri and experiment")
        name = f"evaluate-{report.model_name or Path(report.export_dir).parent.name}" + (
            f"-v{report.version}" if report.version is not None else "")
        with MlflowTracker(tracking_uri, experiment=experiment, run_name=name, system_metrics=False) as tr:
            record(report, tr, training_run=training_run)
        uri = tr.tracking_uri
    else:
        record(report, tracker, training_run=training_run)
        uri = tracking_uri
    if uri and report.model_name and report.version is not None:
        link_version(uri, report.model_name, str(report.version), report.run_id)
    return report.run_id


def record(report: EvaluationReport, tracker: Any, *, training_run: str | None = None) -> None:
    """Log a finished report to a tracker (the `motus.train.tracking.Tracker` protocol)."""
    from ..data.video import encode_mp4

    tags = {RUN_KIND_TAG: "evaluation", "motus.evaluation.export": report.export_dir}
    if report.model_name:
        tags["motus.evaluation.model"] = report.model_name
    if report.version is not None:
        tags["motus.evaluation.version"] = str(report.version)
    if training_run:
        tags["motus.evaluation.training_run"] = training_run
    if report.environment:
        tags[ENVIRONMENT_TAG] = json.dumps(report.environment, sort_keys=True, separators=(",", ":"))
    tracker.set_tags(tags)
    tracker.log_params({"evaluation": {k: v for k, v in report.settings.items() if k != "seeds"},
                        "evaluation.seeds": ",".join(map(str, report.settings.get("seeds", [])))})
    tracker.log_metrics({**report.metrics, **{f"perf/{k}": v for k, v in report.timing.items()}}, 0)
    report.run_id = tracker.run_id
    with tempfile.TemporaryDirectory(prefix="motus-eval-") as tmp:
        folder = Path(tmp)
        rollouts = folder / "rollouts"
        rollouts.mkdir()
        for name, frames in sorted(report.videos.items()):
            (rollouts / name).write_bytes(encode_mp4(frames, fps=report.settings.get("fps", 50)))
        if report.videos:
            tracker.log_artifact(rollouts, "evaluation")
        (folder / "report.json").write_text(report.to_json())
        tracker.log_artifact(folder / "report.json", "evaluation")
    if report.wm_frames is not None:
        real, pred = report.wm_frames
        grid = np.concatenate([np.concatenate(list(real), axis=1), np.concatenate(list(pred), axis=1)], axis=0)
        tracker.log_image(grid, "evaluation/wm_frames.png")


def link_version(tracking_uri: str, name: str, version: str, run_id: str) -> None:
    """Tag the registered model version with its evaluation run (the gates read metrics there first)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.set_model_version_tag(name, str(version), EVALUATION_RUN_TAG, run_id)
    except MlflowException as e:
        raise ValueError(f"cannot tag model version {name}/{version} in {tracking_uri} with its evaluation run "
                         f"{run_id}: {e.message}") from None
