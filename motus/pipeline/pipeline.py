"""The Motus recipe as content-addressed steps: tiers -> flow -> latent actions -> Stage 1 -> gate -> Stage 2 ->
gate -> Stage 3 -> evaluate -> gate (promotion).

This module is the executor; it knows no kind of step by name. Each kind (`motus.pipeline.steps`) declares the
config it reads, the code it runs, what it leaves and how to tell that a cached result is still there. Every
step but the gates has a content key (motus/pipeline/keys.py): code + config + input hashes + parent version.
Before running a step the executor looks its key up in the ledger (motus/pipeline/ledger.py): a FINISHED record
whose outputs still exist (the tier on disk or in the DVC remote, the model version in the registry) is reused;
otherwise the step runs and leaves a record. Gates are never cached: they are cheap, and a promotion must be
decided on the registry as it is now.

A training step's job folder is derived from its key (`outputs/pipeline/runs/<stage>-<key[:12]>`), so a
pipeline killed in the middle of a stage and started again reruns the same key into the same folder, and the
job resumes from its latest complete checkpoint.

No ML here: each step calls the room that owns the work (data, train, track, evaluate).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import get_settings, load_params, resolved_dict
from ..contracts import LineageRecord
from ..data.paths import ProjectPaths
from .errors import GateFailed, InfrastructureError, PipelineError, is_infrastructure_error
from .keys import StepInputs, explain, flatten
from .ledger import Ledger
from .steps import KINDS, Step, StepKind, build_steps
from .steps.gate import verdict_reasons
from .steps.training import root_cause

__all__ = ["GateFailed", "InfrastructureError", "Pipeline", "PipelineError", "PlanRow", "Step", "StepResult",
           "build_steps", "is_infrastructure_error", "root_cause", "verdict_reasons"]


@dataclass
class PlanRow:
    step: str
    kind: str
    action: str  # cached | run | check
    why: list[str]
    key: str | None
    est_device_hours: float | None = None
    est_pool: str | None = None  # the cluster pool the estimate is for; None: this machine


@dataclass
class StepResult:
    step: str
    kind: str
    status: str  # cached | ran | failed
    seconds: float
    compute_seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Pipeline:
    """One pipeline over one params.yaml, one project folder and the stores the settings name. The steps reach
    the shared services through it: params, paths, the registry, the ledger, DVC and the launcher settings."""

    def __init__(self, params_file: str | Path | None = None, *, root: Path | None = None, nproc: int = 1,
                 echo: Callable[[str], None] = print, evaluation: dict[str, Any] | None = None):
        self.settings = get_settings()
        self.root = (root or Path.cwd()).resolve()
        self.params_file = Path(params_file or self.settings.params_file)
        if not self.params_file.is_absolute():
            self.params_file = self.root / self.params_file
        self.params = load_params(self.params_file)
        self.resolved = resolved_dict(self.params)
        self.steps = build_steps(self.params)
        self.by_name = {s.name: s for s in self.steps}
        self.nproc = nproc
        self.echo = echo
        # the evaluate step's settings: params.yaml `evaluation:`, with command-line overrides
        self.evaluation = {**self.resolved.get("evaluation", {}), **(evaluation or {})}
        self.tracking_uri = self.settings.tracking_uri
        self.ledger = Ledger(self.tracking_uri, self.params.project.name)
        self.out_dir = self.root / "outputs" / "pipeline"
        self.paths = ProjectPaths.of(self.params, self.root)
        self.pipeline_run = uuid.uuid4().hex[:12]
        self.outputs: dict[str, dict[str, Any]] = {}
        self.results: list[StepResult] = []
        self._registry = None
        self._remote_ready = False
        self._code: dict[str, dict[str, str]] = {}

    @staticmethod
    def kind_of(step: Step) -> StepKind:
        return KINDS[step.kind]

    @property
    def registry(self):
        if self._registry is None:
            from ..track.registry import Registry

            self._registry = Registry(self.tracking_uri, self.params)
        return self._registry

    # -- selection ------------------------------------------------------------------------------------
    def select(self, from_step: str | None = None, until_step: str | None = None) -> list[Step]:
        names = [s.name for s in self.steps]
        for opt, v in (("--from", from_step), ("--until", until_step)):
            if v is not None and v not in self.by_name:
                raise PipelineError(f"{opt} {v}: no such step; steps are: {', '.join(names)}")
        lo = names.index(from_step) if from_step else 0
        hi = names.index(until_step) + 1 if until_step else len(names)
        if hi <= lo:
            raise PipelineError(f"--until {until_step} comes before --from {from_step}")
        return self.steps[lo:hi]

    # -- inputs and keys ---------------------------------------------------------------------------------
    def inputs(self, step: Step) -> StepInputs | None:
        """The step's inputs from its dependencies' outputs; None while one of them is not known yet."""
        inputs: dict[str, str] = {}
        parent = None
        for d in step.deps:
            out = self.outputs.get(d)
            dep = self.by_name[d]
            kind = self.kind_of(dep)
            if out is None or not kind.ready(out):
                return None
            if (h := kind.as_input(out)) is not None:
                inputs[d] = h
            if (p := kind.as_parent(dep, out)) is not None:
                parent = p
        kind = self.kind_of(step)
        if kind.kind not in self._code:  # read once per pipeline: the code does not change under a run
            self._code[kind.kind] = kind.code()
        return StepInputs(self._code[kind.kind], flatten(kind.config(self, step)), inputs, parent)

    def dep_output(self, step: Step, kind: str) -> Mapping[str, Any]:
        """The output of the step's one dependency of `kind`."""
        found = [self.outputs[d] for d in step.deps if self.by_name[d].kind == kind]
        if len(found) != 1:
            raise PipelineError(f"{step.name}: expected one {kind} dependency with a result, found {len(found)}")
        return found[0]

    # -- plan ---------------------------------------------------------------------------------------------
    def plan(self, from_step: str | None = None, until_step: str | None = None) -> list[PlanRow]:
        """What `run` would do, and why, without doing any of it."""
        selected = {s.name for s in self.select(from_step, until_step)}
        rows: list[PlanRow] = []
        self.outputs = {}
        for step in self.steps:
            kind = self.kind_of(step)
            if not kind.cached:
                action, why, out = kind.plan(self, step)
                if out is not None:
                    self.outputs[step.name] = out
                rows.append(PlanRow(step.name, step.kind, action, [why], None))
                continue
            inputs = self.inputs(step)
            if inputs is None:
                waiting = [d for d in step.deps if d not in self.outputs]
                rows.append(PlanRow(step.name, step.kind, "run", [f"after {', '.join(waiting)}"], None,
                                    kind.estimate(self, step), kind.destination(self, step)[0]))
                continue
            key = inputs.key()
            rec = self.ledger.find(key)
            if rec is not None and kind.still_there(self, step, rec.outputs, repair=False):
                self.outputs[step.name] = rec.outputs
                rows.append(PlanRow(step.name, step.kind, "cached", [kind.describe(rec.outputs)], key))
                continue
            if rec is not None:
                why = ["finished before, but its outputs are gone here (will pull or rebuild)"]
            else:
                last = self.ledger.latest(step.name)
                if last is None:
                    why = ["never ran"]
                elif last.inputs is None:
                    why = ["inputs of the last run were not recorded"]
                else:
                    why = explain(last.inputs, inputs) or ["same inputs, but the last run's outputs are gone"]
            rows.append(PlanRow(step.name, step.kind, "run", why, key, kind.estimate(self, step),
                                kind.destination(self, step)[0]))
        return [r for r in rows if r.step in selected]

    # -- run ------------------------------------------------------------------------------------------------
    def resolve_before(self, first: Step) -> None:
        """Fill outputs of the steps before `first` from the ledger (`--from`): they must be cached."""
        for step in self.steps:
            if step is first:
                return
            kind = self.kind_of(step)
            if not kind.cached:
                self.outputs[step.name] = kind.current(self, step)
                continue
            inputs = self.inputs(step)
            rec = self.ledger.find(inputs.key()) if inputs is not None else None
            if rec is None or not kind.still_there(self, step, rec.outputs, repair=True):
                raise PipelineError(f"--from {first.name}: the earlier step {step.name} has no finished run with the "
                                    f"current inputs; run it first (drop --from, or --from {step.name})")
            self.outputs[step.name] = rec.outputs

    def run_step(self, name: str) -> StepResult:
        step = self.by_name[name]
        kind = self.kind_of(step)
        t0 = time.perf_counter()
        if not kind.cached:
            try:
                out = kind.run(self, step, None)
                kind.check_outputs(step, out)
            except Exception as e:
                self.results.append(StepResult(name, step.kind, "failed", time.perf_counter() - t0, error=str(e)))
                raise
            self.outputs[name] = out
            res = StepResult(name, step.kind, "ran", time.perf_counter() - t0, outputs=out)
            self.results.append(res)
            return res
        inputs = self.inputs(step)
        if inputs is None:
            missing = [d for d in step.deps if d not in self.outputs]
            raise PipelineError(f"{name}: needs {', '.join(missing)} first")
        key = inputs.key()
        rec = self.ledger.find(key)
        if rec is not None and kind.still_there(self, step, rec.outputs, repair=True):
            self.outputs[name] = rec.outputs
            self.echo(f"[{name}] cached ({kind.describe(rec.outputs)}, key {key[:12]})")
            res = StepResult(name, step.kind, "cached", time.perf_counter() - t0, outputs=rec.outputs)
            self.results.append(res)
            return res
        self.echo(f"[{name}] running (key {key[:12]})")
        run_id = self.ledger.start(name, key, inputs, self.pipeline_run)
        try:
            c0 = time.perf_counter()
            out = kind.run(self, step, key)
            kind.check_outputs(step, out)
            compute = time.perf_counter() - c0
        except BaseException as e:
            self.ledger.fail(run_id, f"{type(e).__name__}: {e}")
            self.results.append(StepResult(name, step.kind, "failed", time.perf_counter() - t0, error=str(e)))
            raise
        self.ledger.finish(run_id, out, time.perf_counter() - t0)
        self.outputs[name] = out
        res = StepResult(name, step.kind, "ran", time.perf_counter() - t0, compute, out)
        self.results.append(res)
        self.echo(f"[{name}] done in {res.seconds:.1f}s ({kind.describe(out)})")
        return res

    # -- services the steps share ---------------------------------------------------------------------------
    def _ensure_remote(self) -> None:
        if self._remote_ready:
            return
        from ..data import versioning as v

        v.ensure_repo(self.root)
        v.configure_cache(self.root, self.settings.dvc_cache_type)
        v.configure_remote(self.root, self.settings.data_remote, self.settings.s3_endpoint_url)
        self._remote_ready = True

    def dvc_repro(self, stage: str) -> None:
        """Reproduce one DVC stage and push what it made to the remote."""
        from ..data import versioning as v

        self._ensure_remote()
        try:
            v.repro_stages(self.root, [stage], capture=True)
            v.push_stages(self.root, [stage], capture=True)
        except v.VersioningError as e:
            text = str(e).lower()
            if any(w in text for w in ("connection", "timed out", "unreachable", "endpoint")):
                raise InfrastructureError(str(e)) from None
            raise PipelineError(str(e)) from None

    def dvc_pull(self, stage: str) -> None:
        """Fetch one DVC stage's outputs from the remote (a cached step whose folder is gone here)."""
        from ..data import versioning as v

        self._ensure_remote()
        v.pull_stages(self.root, [stage], capture=True)

    def model_export(self, out: Mapping[str, Any]) -> Path:
        """A training step's export: its run folder when still here, else fetched from the registry."""
        local = Path(out.get("run_dir", "")) / "export"
        if LineageRecord.exists(local):
            return local
        return self.registry.fetch(f"models:/{out['model']}/{out['version']}")

    # -- report ---------------------------------------------------------------------------------------------
    def champions(self) -> dict[str, int | None]:
        """The champion of every model the recipe gates: the stages' and, where a stage trains on latent
        actions, the latent-action VAE's."""
        models = [s.registered_model for _, s in sorted(self.params.stages.items(), key=lambda kv: kv[1].stage)]
        if any(s.action_source == "latent" for s in self.params.stages.values()):
            models.append(self.params.latent_action.registered_model)
        from ..track.registry import UnverifiedAlias

        out = {}
        self.unverified_champions: dict[str, str] = {}
        for model in models:
            try:
                c = self.registry.champion(model)
            except UnverifiedAlias as e:  # not a champion the platform stands behind: said beside the table
                self.unverified_champions[model] = e.state.describe()
                c = None
            except Exception:  # noqa: BLE001 - a model never registered, a store hiccup: no champion to show
                c = None
            out[model] = None if c is None else int(c.version)
        return out
