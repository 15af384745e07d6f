"""Verdicts: a version judged against a gate and the current champion's metrics, recorded on the version as
tags (`motus.verdict*`, the whole verdict as JSON) and as an artifact of its training run. The gate is an
argument: the registry judges by whatever policy its caller holds, it reads no params.yaml of its own."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from ..evaluations import ENVIRONMENT_TAG, EVALUATION_RUN_TAG
from ..gates import Verdict, judge
from .store import ModelVersionRef, RegistryError, Store, default_actor

VERDICT_TAG = "motus.verdict"
VERDICT_JSON_TAG = "motus.verdict.json"


class Verdicts:
    def __init__(self, store: Store):
        self.store = store

    def metrics(self, ref: ModelVersionRef) -> dict[str, float]:
        """Latest value of every metric: the evaluation run's (tag motus.evaluation_run) over the training run's."""
        out: dict[str, float] = {}
        for run_id in (ref.run_id, ref.tags.get(EVALUATION_RUN_TAG)):
            if not run_id:
                continue
            try:
                out.update(self.store.client.get_run(run_id).data.metrics)
            except MlflowException:
                raise RegistryError(f"{ref}: run {run_id} is not in {self.store.tracking_uri}") from None
        return out

    def judge(self, ref: ModelVersionRef, gate: Any, champion: ModelVersionRef | None,
              actor: str | None = None) -> Verdict:
        """Judge `ref` under `gate` against `champion` (None: no champion yet); record the verdict on it."""
        run_tags: dict[str, str] = {}
        if ref.run_id:
            run_tags = dict(self.store.client.get_run(ref.run_id).data.tags)
        evaluation_run = ref.tags.get(EVALUATION_RUN_TAG)
        environment = {}
        if evaluation_run:  # how the numbers judged were produced: what a rerun needs to reproduce them
            try:
                text = self.store.client.get_run(evaluation_run).data.tags.get(ENVIRONMENT_TAG)
            except MlflowException:
                text = None  # a missing evaluation run is named by `metrics` below
            environment = {"evaluation": json.loads(text)} if text else {}
        verdict = judge(ref.name, ref.version, gate, self.metrics(ref),
                        self.metrics(champion) if champion else None, champion.version if champion else None,
                        {**run_tags, **ref.tags}, evaluation_run=evaluation_run,
                        training_run=ref.run_id, actor=actor or default_actor(), **environment)
        self._record(ref, verdict)
        return verdict

    def _record(self, ref: ModelVersionRef, verdict: Verdict) -> None:
        client = self.store.client
        v = str(ref.version)
        for k in [k for k in ref.tags if k.startswith(VERDICT_TAG + ".rule.")]:
            client.delete_model_version_tag(ref.name, v, k)  # a re-evaluation replaces the last verdict
        tags = {VERDICT_TAG: "pass" if verdict.passed else "fail", f"{VERDICT_TAG}.at": verdict.judged_at,
                f"{VERDICT_TAG}.champion": "" if verdict.champion_version is None else str(verdict.champion_version),
                VERDICT_JSON_TAG: verdict.to_json()}
        for i, r in enumerate(verdict.rules):
            tags[f"{VERDICT_TAG}.rule.{i}.{r.metric}"] = f"{'pass' if r.passed else 'fail'}: {r.reason}"
        if ref.run_id:
            stamp = verdict.judged_at.replace(":", "").replace("-", "")
            artifact = f"registry/verdicts/{ref.name}-v{ref.version}-{stamp}.json"
            with tempfile.TemporaryDirectory() as tmp:
                f = Path(tmp) / Path(artifact).name
                f.write_text(json.dumps(json.loads(verdict.to_json()), indent=2) + "\n")
                client.log_artifact(ref.run_id, str(f), str(Path(artifact).parent))
            tags[f"{VERDICT_TAG}.artifact"] = artifact
        for k, val in tags.items():
            client.set_model_version_tag(ref.name, v, k, val)

    def last(self, name: str, version: int | str) -> Verdict | None:
        text = self.store.version(name, version).tags.get(VERDICT_JSON_TAG)
        return Verdict.from_json(text) if text else None
