"""The step ledger: one MLflow run per executed pipeline step, found again by its content key.

Why MLflow and not a local file: the ledger must be shared by every machine that runs the pipeline (a
laptop planning, a Prefect worker running), and MLflow is the one store they all reach already. A step run
carries the tags `motus.step` (its name), `motus.step_key` (its content key) and `motus.step_outputs`
(what it produced: hashes, model versions); its inputs record (code file hashes, config, input hashes,
parent) is the tag `motus.step_inputs`, or the artifact `step/inputs.json` when it is too long for a tag.
Only FINISHED step runs count as cached.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from ..track.tracker import check_reachable, default_artifact_location, resolve_tracking_uri
from .keys import StepInputs

MAX_TAG = 7900


@dataclass
class StepRecord:
    step: str
    key: str
    run_id: str
    status: str
    inputs: StepInputs | None
    outputs: dict[str, Any]
    start_time: int


class Ledger:
    def __init__(self, tracking_uri: str, project: str = "motus"):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        check_reachable(self.tracking_uri)  # one line naming a store that does not answer, not minutes of retries
        self.client = MlflowClient(self.tracking_uri)
        self.experiment_name = f"{project}-pipeline"
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=default_artifact_location(self.tracking_uri))
                except Exception:  # noqa: BLE001 - created by a racing process: read it back
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    # -- reading ------------------------------------------------------------------------------------
    def _record(self, run: Any, with_inputs: bool) -> StepRecord:
        tags = run.data.tags
        inputs = None
        if with_inputs:
            raw = tags.get("motus.step_inputs")
            if raw is None:
                with tempfile.TemporaryDirectory() as d:
                    try:
                        p = self.client.download_artifacts(run.info.run_id, "step/inputs.json", d)
                        raw = Path(p).read_text()
                    except Exception:  # noqa: BLE001 - a record without inputs still caches; it cannot explain
                        raw = None
            inputs = StepInputs.from_dict(json.loads(raw)) if raw else None
        return StepRecord(tags.get("motus.step", ""), tags.get("motus.step_key", ""), run.info.run_id,
                          run.info.status, inputs, json.loads(tags.get("motus.step_outputs") or "{}"),
                          run.info.start_time or 0)

    def find(self, key: str) -> StepRecord | None:
        """The latest FINISHED record with this content key, or None."""
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.`motus.step_key` = '{key}' and attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return self._record(runs[0], with_inputs=False) if runs else None

    def latest(self, step: str) -> StepRecord | None:
        """The latest FINISHED record of this step, whatever its key (what a changed key is explained against)."""
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.`motus.step` = '{step}' and attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return self._record(runs[0], with_inputs=True) if runs else None

    # -- writing ------------------------------------------------------------------------------------
    def start(self, step: str, key: str, inputs: StepInputs, pipeline_run: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=step, tags={
            "motus.run_kind": "pipeline-step", "motus.step": step, "motus.step_key": key,
            "motus.pipeline_run": pipeline_run})
        payload = json.dumps(inputs.to_dict(), sort_keys=True, default=str)
        if len(payload) <= MAX_TAG:
            self.client.set_tag(run.info.run_id, "motus.step_inputs", payload)
        else:
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / "inputs.json"
                f.write_text(payload)
                self.client.log_artifact(run.info.run_id, str(f), "step")
        return run.info.run_id

    def finish(self, run_id: str, outputs: dict[str, Any], seconds: float) -> None:
        self.client.set_tag(run_id, "motus.step_outputs", json.dumps(outputs, sort_keys=True, default=str)[:MAX_TAG])
        self.client.log_metric(run_id, "step/seconds", seconds)
        self.client.set_terminated(run_id, "FINISHED")

    def fail(self, run_id: str, error: str) -> None:
        self.client.set_tag(run_id, "motus.step_error", error[:MAX_TAG])
        self.client.set_terminated(run_id, "FAILED")
