"""The generic trainer every train module runs under (the stage job, the latent-action VAE job).

It owns what the two share: the DeepSpeed engine, resuming from the latest complete checkpoint, the step loop
and its cadence (log, validate, checkpoint), the metrics sink (the tracker on rank 0 and `metrics.jsonl`),
device-hour accounting and the export hook. A `TrainModule` supplies what differs: its model and data, one
step's loss, what it records when it starts, its validation and its export.

What a step sees is a pure function of (seed, step, rank), so a job killed and resumed from its latest
complete checkpoint continues with exactly the losses an uninterrupted run would have had.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .checkpoint import CheckpointSaver, find_latest_complete, remove_leftovers
from .distributed import JobContext, accounting, job_hours, mean_across_ranks
from .engine import resume_latest
from .run_lock import RunFolderLock
from .tracking import NullTracker, Tracker


@dataclass(frozen=True)
class Cadence:
    """How long a job runs and how often it reports, validates and saves (from its params.yaml section)."""

    steps: int
    batch_size: int
    validate_every: int
    checkpoint_every: int
    log_every: int = 1
    keep_checkpoints: int | None = None  # None: keep every checkpoint
    # checkpoints written in the background while training goes on (snapshot at the step boundary, at most one
    # save in flight); None: the environment's MOTUS_CHECKPOINT_ASYNC (default on)
    async_checkpoints: bool | None = None


@dataclass
class TrainResult:
    name: str  # the stage (or `latent-action`) the job trained
    steps: int  # the last step done (the planned steps, or fewer with max_steps)
    run_dir: Path
    export_dir: Path | None  # rank 0 of a job that ran to its planned end
    last_checkpoint: Path | None
    losses: list[tuple[int, float]]
    wall_seconds: float
    device_hours: float
    resumed_from: Path | None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


class TrainModule:
    """What one kind of job trains. Subclasses set the attributes in `__init__` / `build` and implement `loss`;
    the other hooks have defaults that do nothing."""

    name: str  # what its checkpoints record as their stage
    reported: ClassVar[tuple[str, ...]] = ("loss",)  # the loss terms averaged over ranks and logged
    plotted: ClassVar[tuple[str, ...]] = ("loss",)  # the terms of the loss curve artifact
    loss_curve: ClassVar[str] = "loss_curve.png"

    def __init__(self, params: Any, run_dir: Path, ctx: JobContext, tracker: Tracker | None, *,
                 cadence: Cadence, precision: str, config_hash: str, max_steps: int | None = None,
                 parent: str | None = None, code: dict[str, Any] | None = None):
        self.params, self.ctx = params, ctx
        self.run_dir = Path(run_dir)
        self.tracker: Tracker = tracker if (tracker is not None and ctx.rank == 0) else NullTracker()
        self.cadence, self.precision, self.config_hash = cadence, precision, config_hash
        self.max_steps = max_steps  # stop early (tests, smoke runs) without changing the schedule
        self.parent = parent  # what the job started from (recorded in its checkpoints)
        self.code = dict(code or {})  # {commit, dirty} of the code that runs, from the launcher
        self.seed = params.project.seed
        self.model: torch.nn.Module | None = None

    # -- hooks ----------------------------------------------------------------------------------------------
    def build(self) -> None:
        """The model (`self.model`) and the data."""
        raise NotImplementedError

    def before_engine(self, fresh: bool) -> None:
        """Last changes to the model before DeepSpeed wraps it (`fresh`: no checkpoint to resume)."""

    def optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        raise NotImplementedError

    def ds_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def log_start(self, engine: Any, resumed_from: Path | None) -> None:
        """Rank 0, once the engine is ready: tags, params and inputs of the run (or that it resumed)."""

    def loss(self, engine: Any, step: int) -> dict[str, torch.Tensor]:
        """One step's forward on this rank's micro-batch: {"loss": ..., other terms}; its own autocast."""
        raise NotImplementedError

    def step_metrics(self, engine: Any, optimizer: Any, step: int, vals: dict[str, float], dt: float,
                     elapsed: float) -> dict[str, float]:
        """Rank 0: what a logged step reports (to the tracker and metrics.jsonl)."""
        return {f"train/{k}": v for k, v in vals.items()}

    def validate(self, engine: Any, step: int) -> dict[str, float]:
        """Every rank calls it (a collective where the module needs one)."""
        return {}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {}

    def export(self, engine: Any, checkpoint: Path | None, hours: float, wall: float) -> Path | None:
        """Rank 0, at the planned end: the model and its lineage record."""
        return None

    # -- helpers the modules share ---------------------------------------------------------------------------
    def append_metrics(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def _exported_from(export: Path, checkpoint: Path | None) -> bool:
    """Whether `export` is complete (its lineage record is written last) and was made from `checkpoint`."""
    from ..contracts import ContractError, LineageRecord

    if checkpoint is None or not LineageRecord.exists(export):
        return False
    try:
        return LineageRecord.read(export).checkpoint == str(checkpoint)
    except (ContractError, OSError, ValueError):
        return False


class Trainer:
    """Runs one `TrainModule` to its end (or `max_steps`); `start` alone builds the engine (benchmarks)."""

    def __init__(self, module: TrainModule):
        self.m = module
        self.engine: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        background = module.cadence.async_checkpoints
        if background is None:
            from ..config import get_settings

            background = get_settings().checkpoint_async
        self.saver = CheckpointSaver(background=background)

    def start(self) -> Any:
        """Build the module, wrap it in a DeepSpeed engine and resume its latest complete checkpoint."""
        import deepspeed

        m = self.m
        if m.ctx.rank == 0:  # one job per run folder, taken before anything is built; released when the job exits
            self.lock = RunFolderLock(m.run_dir).acquire()
            remove_leftovers(m.run_dir / "checkpoints")  # saves that never finished: no one else writes here now
        m.build()
        m.before_engine(fresh=find_latest_complete(m.run_dir / "checkpoints") is None)
        opt, sched = m.optimizer()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=m.model, optimizer=opt, lr_scheduler=sched, config=m.ds_config())
        self.resumed = resume_latest(self.engine, m.run_dir, precision=m.precision, config_hash=m.config_hash)
        return self.engine

    def run(self) -> TrainResult:
        try:
            return self._run()
        except BaseException:
            self.saver.abandon()  # a failed job commits nothing more: the last committed checkpoint stays the latest
            raise
        finally:  # the process usually exits next, which frees the lock anyway; an in-process rerun needs it now
            if getattr(self, "lock", None) is not None:
                self.lock.release()

    def _run(self) -> TrainResult:
        m, ctx, c = self.m, self.m.ctx, self.m.cadence
        self.start()
        resumed = self.resumed
        if ctx.rank == 0:
            m.run_dir.mkdir(parents=True, exist_ok=True)
            m.log_start(self.engine, resumed.checkpoint)
        end = min(c.steps, m.max_steps or c.steps)
        losses: list[tuple[int, float]] = []
        history: dict[str, list[tuple[int, float]]] = {k: [] for k in m.plotted}
        t_start = time.perf_counter()
        last_ckpt = resumed.checkpoint
        if resumed.step == 0 and end > 0 and getattr(m, "validates_at_start", False):
            # the starting point, measured the same way: how much a job's held-out losses fell is read against it
            m.validate(self.engine, 0)
        for step in range(resumed.step, end):
            self.saver.check()  # a background save that failed fails the job here, at the step boundary
            t0 = time.perf_counter()
            out = m.loss(self.engine, step)
            self.engine.backward(out["loss"])
            self.engine.step()
            dt = time.perf_counter() - t0
            vals = mean_across_ranks({k: float(out[k].detach()) for k in m.reported if k in out}, ctx)
            done = step + 1
            losses.append((done, vals["loss"]))
            for k, series in history.items():
                if k in vals:
                    series.append((done, vals[k]))
            if ctx.rank == 0 and (done % c.log_every == 0 or done == end):
                elapsed = resumed.wall_seconds + time.perf_counter() - t_start
                metrics = m.step_metrics(self.engine, self.optimizer, done, vals, dt, elapsed)
                m.tracker.log_metrics(metrics, done)
                m.append_metrics(done, metrics)
            if done % c.validate_every == 0 or done == c.steps:
                m.validate(self.engine, done)
            if done % c.checkpoint_every == 0 or done == c.steps:
                last_ckpt = self.saver.save(
                    self.engine, m.run_dir / "checkpoints", done, stage=m.name, data_position=done * c.batch_size,
                    config_hash=m.config_hash, parent=m.parent,
                    wall_seconds=resumed.wall_seconds + time.perf_counter() - t_start, keep_last=c.keep_checkpoints,
                    extra={"mlflow_run_id": m.tracker.run_id, "precision": m.precision, **m.checkpoint_extra()})
        self.saver.wait()  # the last checkpoint is committed before the job ends or exports from it
        wall = resumed.wall_seconds + time.perf_counter() - t_start
        hours = job_hours(ctx, wall)
        export = None
        if ctx.rank == 0:
            if end == c.steps and resumed.step == end and _exported_from(m.run_dir / "export", last_ckpt):
                # a rerun of a finished job: its export stands as written (re-exporting would rewrite the lineage
                # record's timings, so the same model would register as a second version)
                export = m.run_dir / "export"
            elif end == c.steps:
                export = m.export(self.engine, last_ckpt, hours, wall)
            m.tracker.log_loss_curve({k: v for k, v in history.items() if v}, m.loss_curve)
            metrics, tags = accounting(ctx, wall, m.params)
            m.tracker.log_metrics(metrics, end)
            m.tracker.set_tags(tags)
        if ctx.world > 1:
            dist.barrier()
        return TrainResult(m.name, end, m.run_dir, export, last_ckpt, losses, wall, hours, resumed.checkpoint, history)
