"""The training steps: the latent-action VAE job and a stage job. Each runs one job through the launcher the
settings name (MOTUS_LAUNCHER), in a folder derived from its content key (so a killed pipeline rerun resumes
the same job from its latest checkpoint), and registers the export: its output is a model version."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...contracts import JobSpec, LineageRecord, device_hours
from ..errors import InfrastructureError, PipelineError
from .base import Context, Step, StepKind


class JobStep(StepKind):
    """A step that trains: one job, then the export registered as a version of its model."""

    outputs = ("model", "version", "run_id", "run_dir", "device_hours")

    def job_stage(self, step: Step) -> str:
        """The stage name the worker runs (a params.yaml stage key, or `latent-action`)."""
        raise NotImplementedError

    def planned_steps(self, pipe: Context, step: Step) -> int:
        raise NotImplementedError

    def init_from(self, pipe: Context, step: Step) -> str | None:
        return None

    def placement(self, pipe: Context, step: Step) -> Any:
        raise NotImplementedError

    def run(self, pipe: Context, step: Step, key: str) -> dict[str, Any]:
        run_dir, job = run_job(pipe, self.job_stage(step), key, self.planned_steps(pipe, step),
                               self.init_from(pipe, step), self.placement(pipe, step))
        ref = pipe.registry.register(run_dir / "export")
        if job:  # where it ran (a cluster job's identity, measured device-hours, goodput) goes on the version
            pipe.registry.tag_version(ref, {f"motus.job.{k}": json.dumps(v) if isinstance(v, dict) else str(v)
                                            for k, v in job.items()})
            if ref.run_id and "goodput" in job:
                for k in ("goodput", "productive_device_hours", "lost_device_hours", "redone_device_hours"):
                    pipe.registry.client.log_metric(ref.run_id, f"goodput/{k}", float(job[k]))
        lineage = LineageRecord.read(run_dir / "export")
        hours = float(job["device_hours"]) if job.get("device_hours") is not None else lineage.device_hours
        held_out = _held_out(pipe, ref.run_id)
        extra = {k: job[k] for k in ("pool", "goodput", "lost_device_hours", "device_hours_by_pool")
                 if job.get(k) is not None}
        return {"model": ref.name, "version": int(ref.version), "run_id": ref.run_id, "run_dir": str(run_dir),
                "device_hours": hours, **extra, **({"held_out": held_out} if held_out else {})}

    def still_there(self, pipe: Context, step: Step, out: Mapping[str, Any], repair: bool) -> bool:
        try:
            pipe.registry.resolve(f"models:/{out['model']}/{out['version']}")
        except Exception:  # noqa: BLE001 - a version that cannot be resolved is not reusable: train it again
            return False
        return True

    def as_parent(self, step: Step, out: Mapping[str, Any]) -> str | None:
        return f"{out['model']}/{out['version']}"

    def describe(self, out: Mapping[str, Any]) -> str:
        return f"{out['model']} v{out['version']}"

    def destination(self, pipe: Context, step: Step) -> tuple[str | None, int]:
        """(pool, devices) the step's job would hold: its cluster pool (params.yaml `cluster`, else MOTUS_POOL)
        x nodes x the pool's GPUs under MOTUS_LAUNCHER=kubernetes; (None, processes) on this machine."""
        if pipe.settings.launcher != "kubernetes":
            return None, pipe.nproc
        placement = self.placement(pipe, step)
        pool = (placement.pool if placement is not None else None) or pipe.settings.pool
        if pool is None or pool not in pipe.params.pools:
            return None, pipe.nproc
        nodes = placement.nodes if placement is not None else 1
        return pool, nodes * max(1, pipe.params.pools[pool].gpus_per_node)

    def estimate(self, pipe: Context, step: Step) -> float | None:
        """Device hours = measured seconds per step (the latest run of this job, wherever it ran) x planned
        steps x the devices it would hold now (`destination`)."""
        try:
            client = pipe.ledger.client
            exp = client.get_experiment_by_name(pipe.params.project.name)
            if exp is None:
                return None
            runs = client.search_runs([exp.experiment_id], f"tags.stage = '{self.job_stage(step)}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
            if not runs:
                return None
            per_step = runs[0].data.metrics.get("perf/step_time_s")
            devices = self.destination(pipe, step)[1]
            return None if per_step is None else device_hours(1, devices, per_step * self.planned_steps(pipe, step))
        except Exception:  # noqa: BLE001 - an estimate is best effort
            return None


class LatentActionStep(JobStep):
    """The latent-action VAE, trained on the optical flow of its tiers."""

    kind = "latent-action"
    modules = ("motus.launch.worker", "motus.train.latent_action")

    def job_stage(self, step: Step) -> str:
        return "latent-action"

    def planned_steps(self, pipe: Context, step: Step) -> int:
        return pipe.params.latent_action.steps

    def placement(self, pipe: Context, step: Step) -> Any:
        return pipe.params.latent_action.cluster

    def config(self, pipe: Context, step: Step) -> dict[str, Any]:
        r = pipe.resolved
        return {"latent_action": _without_placement(r["latent_action"]), "project": {"seed": r["project"]["seed"]},
                "data": {"heldout_fraction": r["data"]["heldout_fraction"]}, "precision": r["precision"]}


class StageStep(JobStep):
    """A stage of the Motus model; Stages 2 and 3 start from their parent's champion."""

    kind = "stage"
    modules = ("motus.launch.worker", "motus.train.stage")

    def job_stage(self, step: Step) -> str:
        return step.target

    def planned_steps(self, pipe: Context, step: Step) -> int:
        return pipe.params.stages[step.target].steps

    def placement(self, pipe: Context, step: Step) -> Any:
        return pipe.params.stages[step.target].cluster

    def config(self, pipe: Context, step: Step) -> dict[str, Any]:
        r = pipe.resolved
        s = _without_placement(r["stages"][step.target])
        return {"stages": {step.target: s}, "model": r["model"], "project": {"seed": r["project"]["seed"]},
                "precision": r["precision"],  # the global one; a stage's own is inside its section
                "data": {k: r["data"][k] for k in ("window", "heldout_fraction")},
                "tiers": {t: {"level": r["tiers"][t]["level"]} for t in s["tiers"]}}

    def init_from(self, pipe: Context, step: Step) -> str | None:
        parent = pipe.params.stages[step.target].parent
        if not parent:
            return None
        champion = pipe.outputs[f"gate:{parent}"]["champion"]
        return str(pipe.registry.fetch(f"models:/{parent}/{champion}"))


HELD_OUT = ("val/video_loss", "val/action_loss", "val/vla_action_mse", "val/floor_zero_action_mse")
# the latent-action VAE does not validate at step 0: its baseline is the untrained VAE's number, logged beside
LAM_HELD_OUT = {"lam/probe_r2": "lam/untrained_probe_r2", "lam/recon_psnr": "lam/untrained_recon_psnr"}


def _held_out(pipe: Context, run_id: str | None) -> dict[str, list[float]]:
    """The job's held-out losses at its first and last validation (a stage validates at step 0 too): what the
    summary says the job learned."""
    if not run_id:
        return {}
    out = {}
    for key in HELD_OUT:
        try:
            history = sorted(pipe.registry.client.get_metric_history(run_id, key), key=lambda m: m.step)
        except Exception:  # noqa: BLE001 - a summary line is best effort; the metrics stay in MLflow
            return out
        if len(history) >= 2:
            out[key] = [float(history[0].value), float(history[-1].value)]
    try:
        run = pipe.registry.client.get_run(run_id).data.metrics
    except Exception:  # noqa: BLE001 - as above
        return out
    for key, base in LAM_HELD_OUT.items():
        if key in run and base in run:
            out[key] = [float(run[base]), float(run[key])]
    return out


def _without_placement(section: Mapping[str, Any]) -> dict[str, Any]:
    """A job's section without `cluster`: where a job runs is not part of what it computes (its content key)."""
    return {k: v for k, v in section.items() if k != "cluster"}


def run_job(pipe: Context, stage: str, key: str, total: int, init_from: str | None = None,
            placement: Any = None) -> tuple[Path, dict[str, Any]]:
    """Run one training job, through MOTUS_LAUNCHER's launcher, in its content-addressed folder; returns the
    folder and what the launcher says about where the job ran (`Launcher.record`)."""
    from ...launch.factory import launcher_for
    from ...launch.launcher import CANCELLED, KILLED

    run_dir = pipe.out_dir / "runs" / f"{stage}-{key[:12]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = JobSpec(stage=stage, run_dir=run_dir, params_file=pipe.params_file, procs_per_node=pipe.nproc,
                   init_from=init_from, env={"MOTUS_TRACKING_URI": pipe.tracking_uri})
    log = run_dir / "job.log"
    launcher = launcher_for(pipe.settings, log=log)
    if launcher.kind == "kubernetes":
        spec = cluster_job(pipe, spec, placement)
    resumed = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    where = f" on {spec.pool} ({spec.nodes} node{'s' if spec.nodes > 1 else ''})" if spec.pool else ""
    pipe.echo(f"  {stage}: {'resuming' if resumed else 'starting'}{where} in {run_dir} (log: {log})")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(pipe.echo, stage, total, run_dir, stop), daemon=True)
    watcher.start()
    killed: list[dict[str, Any]] = []  # attempts killed on a pool the job then left (fallback)
    try:
        handle, outcome = _attempt(pipe, launcher, spec, stage)
        fallback = getattr(placement, "fallback", None) if launcher.kind == "kubernetes" else None
        if outcome.state == KILLED and fallback and spec.pool != fallback:
            # the pool took the job's nodes back more often than its restarts allow: its device-hours are spent
            # (they count as lost), its checkpoints are not (the same run folder and S3 mirror resume it there)
            killed.append(launcher.record(handle))
            pipe.echo(f"  {stage}: killed on {spec.pool} ({outcome.message}); resubmitting to its fallback pool "
                      f"{fallback}, resuming from the latest checkpoint")
            spec = spec.with_updates(pool=fallback)
            handle, outcome = _attempt(pipe, launcher, spec, stage)
    finally:
        stop.set()
        watcher.join(timeout=2)
    if not outcome.ok:
        try:
            logs = launcher.logs(handle)
        except Exception as e:  # noqa: BLE001 - a deleted job has no pods left to read; say so, keep the cause
            logs = f"(no logs: {e})"
        if launcher.kind != "local":
            log.write_text(logs)
        cause = root_cause(logs)
        if outcome.state == CANCELLED:  # deleted on purpose: retrying would undo what its owner did
            raise PipelineError(f"{stage} was cancelled: {outcome.message}; nothing was registered (log: {log})")
        if outcome.state == KILLED:  # killed from outside (OOM killer, preemption): retryable
            raise InfrastructureError(f"{stage} was killed ({outcome.message}); rerunning resumes it ({log})")
        raise PipelineError(f"{stage} failed ({outcome.message}): {cause} (log: {log})")
    job = with_killed_attempts(launcher.record(handle), killed)
    from ...track.accounting import run_goodput

    good = None if job.get("device_hours") is None else run_goodput(run_dir, float(job["device_hours"]),
                                                                     int(job.get("devices") or 1))
    if good is not None:
        job.update(good)
        pipe.echo(f"  {stage}: goodput {job['goodput']:.0%} ({job['lost_device_hours']:.4f} of "
                  f"{job['device_hours']:.4f} device h lost; {int(job['redone_steps'])} steps redone, "
                  f"{job['restarts']} restarts)")
    return run_dir, job


def _attempt(pipe: Context, launcher: Any, spec: JobSpec, stage: str) -> tuple[Any, Any]:
    """Submit one job and wait for it; Ctrl-C cancels it."""
    handle = launcher.submit(spec)
    if launcher.kind == "kubernetes":
        pipe.echo(f"  {stage}: PyTorchJob {handle.detail.get('namespace')}/{handle.name} queued on {spec.pool}")
    try:
        return handle, launcher.wait(handle)
    except KeyboardInterrupt:
        launcher.cancel(handle)
        raise


def with_killed_attempts(job: dict[str, Any], killed: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of a job that finished after earlier attempts were killed on another pool: device-hours (and
    restarts) are the sum of every attempt's, split per pool; identity (name, uid, pool) is the finishing one's."""
    if not killed:
        return job
    attempts = [*killed, job]
    by_pool: dict[str, float] = {}
    for a in attempts:
        if a.get("device_hours") is not None:
            by_pool[str(a.get("pool"))] = by_pool.get(str(a.get("pool")), 0.0) + float(a["device_hours"])
    return {**job, "device_hours": sum(by_pool.values()) if by_pool else job.get("device_hours"),
            "device_hours_by_pool": by_pool, "restarts": sum(int(a.get("restarts") or 0) for a in attempts),
            "pools": ",".join(str(a.get("pool")) for a in attempts)}


def cluster_job(pipe: Context, spec: JobSpec, placement: Any) -> JobSpec:
    """The spec as a cluster runs it: the run folder relative to the project (the workspace volume, the pods'
    working directory), the stage's pool (else MOTUS_POOL) and nodes."""
    try:
        rel = Path(spec.run_dir).resolve().relative_to(pipe.root.resolve())
    except ValueError:
        raise PipelineError(f"MOTUS_LAUNCHER=kubernetes: the run folder {spec.run_dir} is outside the project "
                            f"{pipe.root}, which is the jobs' workspace volume; keep the pipeline's outputs in the "
                            "project") from None
    pool = (placement.pool if placement is not None else None) or pipe.settings.pool
    nodes = placement.nodes if placement is not None else 1
    return spec.with_updates(run_dir=rel, pool=pool, nodes=nodes, procs_per_node=1)


def _watch(echo, stage: str, total: int, run_dir: Path, stop: threading.Event) -> None:
    """Progress of a running job from its metrics.jsonl, every few seconds."""
    path, seen = run_dir / "metrics.jsonl", None
    while not stop.wait(5.0):
        try:
            last = json.loads(path.read_text().splitlines()[-1])
        except (OSError, IndexError, ValueError):
            continue
        if last.get("step") != seen:
            seen = last.get("step")
            loss = last.get("train/loss", last.get("loss"))
            echo(f"  {stage}: step {seen}/{total}" + (f" loss {loss:.4f}" if isinstance(loss, float) else ""))


def root_cause(log: str) -> str:
    """The exception a job died of, from its log (not torchrun's summary of it)."""
    found = [m.group(1) for m in re.finditer(r"^(?:\[rank\d+\]: )?([\w.]*(?:Error|Exception)\b: .+)$", log, re.M)
             if "ChildFailedError" not in m.group(1)]
    return found[-1] if found else (log.strip().splitlines() or ["no output"])[-1]
