"""The Motus recipe as content-addressed steps: tiers -> flow -> latent actions -> Stage 1 -> gate -> Stage 2 ->
gate -> Stage 3 -> evaluate -> gate (promotion).

Every step but the gates has a content key (motus/pipeline/keys.py). Before running a step the pipeline looks
its key up in the ledger (motus/pipeline/ledger.py): a FINISHED record whose outputs still exist (the tier on
disk or in the DVC remote, the model version in the registry) is reused; otherwise the step runs and leaves a
record. Gates are never cached: they are cheap, and a promotion must be decided on the registry as it is now.

A stage's job folder is derived from its key (`outputs/pipeline/runs/<stage>-<key[:12]>`), so a pipeline
killed in the middle of a stage and started again reruns the same key into the same folder, and the job
resumes from its latest complete checkpoint.

No ML here: each executor calls the room that owns the work (data, train, track, evaluate).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import get_settings, load_params, resolved_dict
from ..contracts import MANIFEST_FILE, LineageRecord, device_hours
from ..data.paths import ProjectPaths
from .keys import StepInputs, code_files, explain, flatten
from .ledger import Ledger

KINDS = ("tier", "flow", "latent-action", "latent-actions", "stage", "evaluate", "gate")


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
    # requests / botocore connection failures without importing either
    return type(exc).__name__ in {"ConnectionError", "EndpointConnectionError", "ConnectTimeout", "ReadTimeout"}


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    target: str  # tier name, stage key or registered model name
    deps: tuple[str, ...] = ()


@dataclass
class PlanRow:
    step: str
    kind: str
    action: str  # cached | run | check
    why: list[str]
    key: str | None
    est_device_hours: float | None = None


@dataclass
class StepResult:
    step: str
    kind: str
    status: str  # cached | ran | failed
    seconds: float
    compute_seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ------------------------------------------------------------------------------------------------ graph


def build_steps(params: Any) -> list[Step]:
    """The recipe as a list in execution order (each step after its dependencies)."""
    from ..data.latent_actions import lam_tiers

    steps = [Step(f"tier:{t}", "tier", t) for t in params.tiers]
    stages = sorted(params.stages.items(), key=lambda kv: kv[1].stage)
    if any(s.action_source == "latent" for _, s in stages):
        lam = lam_tiers(params)
        steps += [Step(f"flow:{t}", "flow", t, (f"tier:{t}",)) for t in lam]
        lam_model = params.latent_action.registered_model
        steps.append(Step("latent-action", "latent-action", lam_model,
                          tuple(f"flow:{t}" for t in lam) + tuple(f"tier:{t}" for t in lam)))
        steps += [Step(f"latent-actions:{t}", "latent-actions", t, ("latent-action", f"flow:{t}")) for t in lam]
    for key, s in stages:
        deps = [f"tier:{t}" for t in s.tiers]
        if s.action_source == "latent":
            deps += [f"latent-actions:{t}" for t in s.tiers]
        if s.parent:
            deps.append(f"gate:{s.parent}")
        steps.append(Step(key, "stage", key, tuple(deps)))
        gate_dep = key
        if s.action_source == "real":  # the target robot's model is judged on closed-loop rollouts too
            steps.append(Step(f"evaluate:{s.registered_model}", "evaluate", s.registered_model, (key,)))
            gate_dep = f"evaluate:{s.registered_model}"
        steps.append(Step(f"gate:{s.registered_model}", "gate", s.registered_model, (gate_dep,)))
    return steps


def _stage_of_model(params: Any, model: str) -> str:
    for key, s in params.stages.items():
        if s.registered_model == model:
            return key
    raise PipelineError(f"no stage in params.yaml registers '{model}'")


# --------------------------------------------------------------------------------------------- pipeline


class Pipeline:
    """One pipeline over one params.yaml, one project folder and the stores the settings name."""

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
        self.data_root = self.paths.tiers
        self.pipeline_run = uuid.uuid4().hex[:12]
        self.outputs: dict[str, dict[str, Any]] = {}
        self.results: list[StepResult] = []
        self._registry = None
        self._remote_ready = False

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
    def _config(self, step: Step) -> dict[str, Any]:
        r = self.resolved
        if step.kind == "tier":
            sub = {"tiers": {step.target: r["tiers"][step.target]},
                   "data": {"codec": r["data"]["codec"], "shard_mb": r["data"]["shard_mb"]}}
        elif step.kind == "flow":
            sub = {"latent_action": {"flow": r["latent_action"]["flow"]}}
        elif step.kind == "latent-action":
            sub = {"latent_action": r["latent_action"], "project": {"seed": r["project"]["seed"]},
                   "data": {"heldout_fraction": r["data"]["heldout_fraction"]}, "precision": r["precision"]}
        elif step.kind == "latent-actions":
            sub = {}
        elif step.kind == "stage":
            s = r["stages"][step.target]
            sub = {"stages": {step.target: s}, "model": r["model"], "project": {"seed": r["project"]["seed"]},
                   "precision": r["precision"],  # the global one; a stage's own is inside its section
                   "data": {k: r["data"][k] for k in ("window", "heldout_fraction")},
                   "tiers": {t: {"level": r["tiers"][t]["level"]} for t in s["tiers"]}}
        elif step.kind == "evaluate":
            sub = {"evaluation": self.evaluation, "data": {"window": r["data"]["window"]}}
        else:
            sub = {}
        return flatten(sub)

    def inputs(self, step: Step) -> StepInputs | None:
        """The step's inputs from its dependencies' outputs; None while one of them is not known yet."""
        inputs: dict[str, str] = {}
        parent = None
        for d in step.deps:
            out = self.outputs.get(d)
            if out is None:
                return None
            dep = self.by_name[d]
            if dep.kind in ("tier", "flow", "latent-actions"):
                inputs[d] = out["content_hash"]
            elif dep.kind in ("latent-action", "stage"):
                parent = f"{out['model']}/{out['version']}"
            elif dep.kind == "gate":
                if out.get("champion") is None:
                    return None
                parent = f"{dep.target}/{out['champion']}"
            elif dep.kind == "evaluate":
                inputs[d] = out["run_id"]
        return StepInputs(code_files(step.kind), self._config(step), inputs, parent)

    # -- cache validity ----------------------------------------------------------------------------------
    def _still_there(self, step: Step, out: dict[str, Any], repair: bool) -> bool:
        """Do a cached record's outputs still exist? With `repair`, fetch what can be fetched (DVC pull)."""
        from ..data.features import Feature
        from ..data.tier import Tier

        try:
            if step.kind == "tier":
                path = self.data_root / step.target
                if self._hash_of(Tier, path) == out.get("content_hash"):
                    return True
                if repair:
                    from ..data import versioning as v

                    self._ensure_remote()
                    v.pull_stages(self.root, [f"ingest@{step.target}"], capture=True)
                    return self._hash_of(Tier, path) == out.get("content_hash")
                return False
            if step.kind in ("flow", "latent-actions"):
                feat = "flow" if step.kind == "flow" else "latent_actions"
                path = self.paths.feature(feat, step.target)
                if self._hash_of(Feature, path) == out.get("content_hash"):
                    return True
                if repair:  # both are DVC stages: flow@<tier>, latent-actions@<tier>
                    from ..data import versioning as v

                    self._ensure_remote()
                    v.pull_stages(self.root, [f"{step.kind}@{step.target}"], capture=True)
                    return self._hash_of(Feature, path) == out.get("content_hash")
                return False
            if step.kind in ("latent-action", "stage"):
                self.registry.resolve(f"models:/{out['model']}/{out['version']}")
                return True
            if step.kind == "evaluate":
                self.ledger.client.get_run(out["run_id"])
                return True
        except Exception:  # noqa: BLE001 - anything missing means: not reusable, run the step
            return False
        return False

    @staticmethod
    def _hash_of(cls, path: Path) -> str | None:
        if not (path / MANIFEST_FILE).is_file():
            return None
        return cls(path).content_hash

    # -- plan ---------------------------------------------------------------------------------------------
    def plan(self, from_step: str | None = None, until_step: str | None = None) -> list[PlanRow]:
        """What `run` would do, and why, without doing any of it."""
        selected = {s.name for s in self.select(from_step, until_step)}
        rows: list[PlanRow] = []
        self.outputs = {}
        for step in self.steps:
            if step.kind == "gate":
                rows.append(self._plan_gate(step))
                continue
            inputs = self.inputs(step)
            if inputs is None:
                waiting = [d for d in step.deps if d not in self.outputs]
                rows.append(PlanRow(step.name, step.kind, "run", [f"after {', '.join(waiting)}"], None,
                                    self._estimate(step)))
                continue
            key = inputs.key()
            rec = self.ledger.find(key)
            if rec is not None and self._still_there(step, rec.outputs, repair=False):
                self.outputs[step.name] = rec.outputs
                rows.append(PlanRow(step.name, step.kind, "cached", [self._describe(step, rec.outputs)], key))
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
            rows.append(PlanRow(step.name, step.kind, "run", why, key, self._estimate(step)))
        return [r for r in rows if r.step in selected]

    def _plan_gate(self, step: Step) -> PlanRow:
        dep = self.outputs.get(step.deps[0])
        if dep is None:
            return PlanRow(step.name, "gate", "run", [f"after {step.deps[0]}"], None)
        version = self._gated_version(step)
        champ = self.registry.champion(step.target)
        if champ is not None and int(champ.version) == int(version):
            self.outputs[step.name] = {"champion": int(version), "verdict": "champion"}
            return PlanRow(step.name, "gate", "cached", [f"v{version} is already champion"], None)
        return PlanRow(step.name, "gate", "check", [f"decide on v{version}" + (
            f" (champion now v{champ.version})" if champ else " (no champion yet)")], None)

    def _gated_version(self, step: Step) -> int:
        """The version a gate decides on: its stage's (or that stage's evaluation's) output."""
        return int(self.outputs[step.deps[0]]["version"])

    def _describe(self, step: Step, out: dict[str, Any]) -> str:
        if "version" in out and "model" in out:
            return f"{out['model']} v{out['version']}"
        if "content_hash" in out:
            return f"content {str(out['content_hash'])[:12]}"
        if "run_id" in out:
            return f"evaluation run {out['run_id'][:12]}"
        return "cached"

    def _estimate(self, step: Step) -> float | None:
        """Device hours = measured seconds per step (the latest run of this stage) x planned steps x devices."""
        if step.kind not in ("stage", "latent-action"):
            return None
        steps = (self.params.stages[step.target].steps if step.kind == "stage" else self.params.latent_action.steps)
        try:
            exp = self.ledger.client.get_experiment_by_name(self.params.project.name)
            if exp is None:
                return None
            name = step.target if step.kind == "stage" else "latent-action"
            runs = self.ledger.client.search_runs([exp.experiment_id], f"tags.stage = '{name}'",
                                                  order_by=["attributes.start_time DESC"], max_results=1)
            if not runs:
                return None
            m = runs[0].data.metrics
            per_step = m.get("perf/step_time_s")
            devices = float(runs[0].data.tags.get("devices", self.nproc))
            return None if per_step is None else device_hours(1, int(devices), per_step * steps)
        except Exception:  # noqa: BLE001 - an estimate is best effort
            return None

    # -- run ------------------------------------------------------------------------------------------------
    def resolve_before(self, first: Step) -> None:
        """Fill outputs of the steps before `first` from the ledger (`--from`): they must be cached."""
        for step in self.steps:
            if step is first:
                return
            if step.kind == "gate":
                champ = self.registry.champion(step.target)
                self.outputs[step.name] = {"champion": None if champ is None else int(champ.version)}
                continue
            inputs = self.inputs(step)
            rec = self.ledger.find(inputs.key()) if inputs is not None else None
            if rec is None or not self._still_there(step, rec.outputs, repair=True):
                raise PipelineError(f"--from {first.name}: the earlier step {step.name} has no finished run with the "
                                    f"current inputs; run it first (drop --from, or --from {step.name})")
            self.outputs[step.name] = rec.outputs

    def run_step(self, name: str) -> StepResult:
        step = self.by_name[name]
        t0 = time.perf_counter()
        if step.kind == "gate":
            try:
                out = self._gate(step)
            except Exception as e:
                self.results.append(StepResult(name, step.kind, "failed", time.perf_counter() - t0, error=str(e)))
                raise
            res = StepResult(name, step.kind, "ran", time.perf_counter() - t0, outputs=out)
            self.results.append(res)
            return res
        inputs = self.inputs(step)
        if inputs is None:
            missing = [d for d in step.deps if d not in self.outputs]
            raise PipelineError(f"{name}: needs {', '.join(missing)} first")
        key = inputs.key()
        rec = self.ledger.find(key)
        if rec is not None and self._still_there(step, rec.outputs, repair=True):
            self.outputs[name] = rec.outputs
            self.echo(f"[{name}] cached ({self._describe(step, rec.outputs)}, key {key[:12]})")
            res = StepResult(name, step.kind, "cached", time.perf_counter() - t0, outputs=rec.outputs)
            self.results.append(res)
            return res
        self.echo(f"[{name}] running (key {key[:12]})")
        run_id = self.ledger.start(name, key, inputs, self.pipeline_run)
        try:
            c0 = time.perf_counter()
            out = getattr(self, "_" + step.kind.replace("-", "_"))(step, key)
            compute = time.perf_counter() - c0
        except BaseException as e:
            self.ledger.fail(run_id, f"{type(e).__name__}: {e}")
            self.results.append(StepResult(name, step.kind, "failed", time.perf_counter() - t0, error=str(e)))
            raise
        self.ledger.finish(run_id, out, time.perf_counter() - t0)
        self.outputs[name] = out
        res = StepResult(name, step.kind, "ran", time.perf_counter() - t0, compute, out)
        self.results.append(res)
        self.echo(f"[{name}] done in {res.seconds:.1f}s ({self._describe(step, out)})")
        return res

    # -- executors: each calls the room that owns the work -------------------------------------------------
    def _ensure_remote(self) -> None:
        if self._remote_ready:
            return
        from ..data import versioning as v

        v.ensure_repo(self.root)
        v.configure_remote(self.root, self.settings.data_remote, self.settings.s3_endpoint_url)
        self._remote_ready = True

    def _dvc(self, stage: str) -> None:
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

    def _tier(self, step: Step, key: str) -> dict[str, Any]:
        from ..data.tier import Tier
        from ..data.versioning import locked_hashes

        self._dvc(f"ingest@{step.target}")
        tier = Tier(self.data_root / step.target)
        return {"content_hash": tier.content_hash, "dvc_hash": locked_hashes(self.root).get(step.target),
                "level": tier.manifest.level, "episodes": tier.manifest.episodes}

    def _flow(self, step: Step, key: str) -> dict[str, Any]:
        from ..data.features import Feature

        self._dvc(f"flow@{step.target}")
        f = Feature(self.paths.feature("flow", step.target))
        return {"content_hash": f.content_hash, "episodes": len(f)}

    def _job(self, stage: str, key: str, init_from: str | None = None) -> Path:
        """Run one training job, through MOTUS_LAUNCHER's launcher, in its content-addressed folder."""
        from ..contracts import JobSpec
        from ..launch.factory import launcher_for
        from ..launch.launcher import KILLED

        run_dir = self.out_dir / "runs" / f"{stage}-{key[:12]}"
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = JobSpec(stage=stage, run_dir=run_dir, params_file=self.params_file, procs_per_node=self.nproc,
                       init_from=init_from, env={"MOTUS_TRACKING_URI": self.tracking_uri})
        log = run_dir / "job.log"
        resumed = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
        self.echo(f"  {stage}: {'resuming' if resumed else 'starting'} in {run_dir} (log: {log})")
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(stage, run_dir, stop), daemon=True)
        watcher.start()
        launcher = launcher_for(self.settings, log=log)
        try:
            handle = launcher.submit(spec)
            try:
                outcome = launcher.wait(handle)
            except KeyboardInterrupt:
                launcher.cancel(handle)
                raise
        finally:
            stop.set()
            watcher.join(timeout=2)
        if not outcome.ok:
            cause = root_cause(launcher.logs(handle))
            if outcome.state == KILLED:  # killed from outside (OOM killer, preemption): retryable
                raise InfrastructureError(f"{stage} was killed ({outcome.message}); rerunning resumes it ({log})")
            raise PipelineError(f"{stage} failed ({outcome.message}): {cause} (log: {log})")
        return run_dir

    def _watch(self, stage: str, run_dir: Path, stop: threading.Event) -> None:
        """Progress of a running job from its metrics.jsonl, every few seconds."""
        path, seen = run_dir / "metrics.jsonl", None
        total = self.params.stages[stage].steps if stage in self.params.stages else self.params.latent_action.steps
        while not stop.wait(5.0):
            try:
                last = json.loads(path.read_text().splitlines()[-1])
            except (OSError, IndexError, ValueError):
                continue
            if last.get("step") != seen:
                seen = last.get("step")
                loss = last.get("train/loss", last.get("loss"))
                self.echo(f"  {stage}: step {seen}/{total}" + (f" loss {loss:.4f}" if isinstance(loss, float) else ""))

    def _register(self, run_dir: Path) -> dict[str, Any]:
        ref = self.registry.register(run_dir / "export")
        lineage = LineageRecord.read(run_dir / "export")
        return {"model": ref.name, "version": int(ref.version), "run_id": ref.run_id, "run_dir": str(run_dir),
                "device_hours": lineage.device_hours}

    def _latent_action(self, step: Step, key: str) -> dict[str, Any]:
        return self._register(self._job("latent-action", key))

    def _model_export(self, out: dict[str, Any]) -> Path:
        local = Path(out.get("run_dir", "")) / "export"
        if LineageRecord.exists(local):
            return local
        return self.registry.fetch(f"models:/{out['model']}/{out['version']}")

    def _latent_actions(self, step: Step, key: str) -> dict[str, Any]:
        """The DVC stage `latent-actions@<tier>` (so dvc.lock and the remote hold it, like every feature), from
        the latent-action VAE this run registered, published where dvc.yaml reads it."""
        from ..data.features import Feature

        self._publish(self._model_export(self.outputs["latent-action"]), self.paths.latent_action_model)
        self._dvc(f"latent-actions@{step.target}")
        f = Feature(self.paths.feature("latent_actions", step.target))
        return {"content_hash": f.content_hash, "episodes": len(f)}

    @staticmethod
    def _publish(export: Path, target: Path) -> None:
        """Put `export` at `target` (replaced whole, by a rename) unless the same content is already there."""
        import shutil

        from ..data.tier import folder_hash

        if target.is_dir() and folder_hash(target) == folder_hash(export):
            return
        tmp = target.with_name(target.name + ".publishing")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(export, tmp)
        old = target.with_name(target.name + ".old")
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)

    def _stage(self, step: Step, key: str) -> dict[str, Any]:
        s = self.params.stages[step.target]
        init_from = None
        if s.parent:
            champion = self.outputs[f"gate:{s.parent}"]["champion"]
            init_from = str(self.registry.fetch(f"models:/{s.parent}/{champion}"))
        return self._register(self._job(step.target, key, init_from))

    def _evaluate(self, step: Step, key: str) -> dict[str, Any]:
        from ..evaluate import evaluate_model
        from ..track.evaluations import record_evaluation

        stage = self.by_name[step.deps[0]]
        out = self.outputs[stage.name]
        ev = self.evaluation
        seeds = list(range(int(ev["first_seed"]), int(ev["first_seed"]) + int(ev["seeds"])))
        report = evaluate_model(self.params, self._model_export(out), model_name=out["model"],
                                version=int(out["version"]), seeds=seeds,
                                tasks=list(ev["tasks"]), max_steps=int(ev["max_steps"]),
                                video_episodes=int(ev["video_episodes"]), workers=ev.get("workers"),
                                progress=False, echo=self.echo)
        record_evaluation(report, tracking_uri=self.tracking_uri, experiment=self.params.project.name)
        keep = {k: v for k, v in report.metrics.items() if k.count("/") == 1}
        return {"run_id": report.run_id, "model": out["model"], "version": int(out["version"]), "metrics": keep}

    def _gate(self, step: Step) -> dict[str, Any]:
        version = self._gated_version(step)
        model = step.target
        champ = self.registry.champion(model)
        if champ is not None and int(champ.version) == version:
            self.outputs[step.name] = {"champion": version, "verdict": "champion"}
            self.echo(f"[{step.name}] v{version} is already champion")
            return self.outputs[step.name]
        verdict = self.registry.evaluate(model, version)
        if not verdict.passed:
            raise GateFailed(f"{model} v{version} did not pass its gate: {verdict_reasons(verdict)}")
        self.registry.promote(model, version, actor=f"pipeline {self.pipeline_run}")
        self.outputs[step.name] = {"champion": version, "verdict": "pass"}
        self.echo(f"[{step.name}] v{version} passed every rule and is now champion")
        return self.outputs[step.name]

    # -- report ---------------------------------------------------------------------------------------------
    def champions(self) -> dict[str, int | None]:
        out = {}
        for _key, s in sorted(self.params.stages.items(), key=lambda kv: kv[1].stage):
            try:
                c = self.registry.champion(s.registered_model)
            except Exception:  # noqa: BLE001
                c = None
            out[s.registered_model] = None if c is None else int(c.version)
        return out


def root_cause(log: str) -> str:
    """The exception a job died of, from its log (not torchrun's summary of it)."""
    import re

    found = [m.group(1) for m in re.finditer(r"^(?:\[rank\d+\]: )?([\w.]*(?:Error|Exception)\b: .+)$", log, re.M)
             if "ChildFailedError" not in m.group(1)]
    return found[-1] if found else (log.strip().splitlines() or ["no output"])[-1]


def verdict_reasons(verdict: Any) -> str:
    """The failing rules of a verdict, each with its label (metric and bound) and reason."""
    failing = [f"{r.label}: {r.reason}" for r in verdict.rules if not r.passed]
    return "; ".join(failing) or verdict.summary()

