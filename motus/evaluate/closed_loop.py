"""Closed-loop rollouts in gym-aloha: the model as a policy, beside its floors (zero / random actions) and
its ceiling (the scripted expert), on the same held-out seeds.

One rollout: reset gym-aloha's joint-space scene at `seed` (the object poses `AlohaEnv.reset(seed)` draws),
then until the episode-length cap: when the policy has no actions left, it observes (the training camera,
rendered at the tier's stored size, state = qpos) and plans; the next action is executed for one 50 Hz step.
The model plans an action chunk (`vla` or `joint` mode) built from the observation exactly as training builds
a window (`ExportedModel.inputs`), un-normalises it with the tier's statistics, and holds each action for the
window spec's `downsample` steps, because training windows space consecutive actions that many stored frames
apart. Success = the task's reward reached its maximum (4) at some step, as `scripted_success` counts it.

Rollouts are independent, so they run in a process pool (spawned workers, each loading the export once).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_POLICIES = ("vla", "joint")
BASELINES = ("zero", "random", "scripted")
POLICIES = MODEL_POLICIES + BASELINES
GYM_ALOHA_STEP_LIMIT = 300  # gym-aloha registers its tasks with max_episode_steps=300


@dataclass(frozen=True)
class TaskSetup:
    """How the model met a task in training: its tier (normalisation), camera view and stored image size."""

    task: str
    tier: str
    view: str
    image_size: tuple[int, int]
    instruction: str


@dataclass(frozen=True)
class RolloutSettings:
    """Everything a worker needs (picklable): the export and params, the tasks, the cap, sampling."""

    export_dir: str | None
    params: Any
    tasks: dict[str, TaskSetup]
    max_steps: int = GYM_ALOHA_STEP_LIMIT
    hold: int = 1  # sim steps per planned action: the window spec's downsample (floors use the same rate)
    sample_steps: int | None = None  # Euler steps per plan; None = the model's inference_steps
    noise_seed: int = 0
    threads: int | None = None  # torch threads per worker
    server_url: str | None = None  # the model policies' plans asked of this policy server (`motus serve`)


@dataclass(frozen=True)
class Rollout:
    policy: str
    task: str
    seed: int
    record: bool = False  # keep every frame for a video


@dataclass
class RolloutResult:
    policy: str
    task: str
    seed: int
    success: bool
    max_reward: float
    steps: int
    plans: int
    policy_seconds: float  # time spent planning (model inference for the model policies)
    seconds: float
    frames: np.ndarray | None = field(default=None, repr=False)  # [T, H, W, 3] when recorded
    diverged: str | None = None  # why the simulation stopped early (non-finite action, unstable physics)

    def summary(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("policy", "task", "seed", "success", "max_reward", "steps", "plans",
                                              "policy_seconds", "seconds", "diverged")}


# ------------------------------------------------------------------------------------------------ policies

class _ZeroPolicy:
    """Floor: every joint target 0 (grippers closed), the literal zero action."""

    needs_frame = False

    def __init__(self, hold: int):
        self.hold = hold

    def plan(self, frame, qpos, sim) -> np.ndarray:
        return np.zeros((self.hold, 14), dtype=np.float64)


class _RandomPolicy:
    """Floor: a uniform random joint target inside the joint limits (grippers uniform in [0, 1]), a new one
    every `hold` steps: the model's control rate, without the model."""

    needs_frame = False

    def __init__(self, hold: int, seed: int, sim):
        from ..sim.aloha import joint_limits

        self.hold = hold
        self.lo, self.hi = joint_limits(sim.model, margin=0.0)
        self.rng = np.random.default_rng([seed, 0x5EED])

    def plan(self, frame, qpos, sim) -> np.ndarray:
        arms = self.rng.uniform(self.lo, self.hi)
        grips = self.rng.uniform(0.0, 1.0, size=2)
        a = np.concatenate([arms[:6], grips[:1], arms[6:], grips[1:]])
        return np.repeat(a[None], self.hold, axis=0)


class _ScriptedPolicy:
    """Ceiling: the scripted expert that made the demonstrations, re-planning from the true physics state."""

    needs_frame = False

    def __init__(self, task: str, seed: int, ee_sim):
        from ..sim.aloha import ScriptedAlohaPolicy

        self.policy = ScriptedAlohaPolicy(task, seed=seed, _sim=ee_sim)

    def plan(self, frame, qpos, sim) -> np.ndarray:
        return self.policy.step(physics=sim.physics)[None].astype(np.float64)


class ModelPolicy:
    """Motus as a policy: observation -> the training inputs -> an action chunk (vla or joint mode)."""

    needs_frame = True

    def __init__(self, exported: Any, mode: str, setup: TaskSetup, seed: int, noise_seed: int = 0,
                 sample_steps: int | None = None):
        if mode not in MODEL_POLICIES:
            raise ValueError(f"model policy mode must be one of {MODEL_POLICIES}, got {mode!r}")
        self.exported, self.mode, self.setup = exported, mode, setup
        exported.normalization(setup.tier)  # refused now, naming the tier, if the export cannot un-normalise it
        self.seed, self.noise_seed, self.sample_steps = seed, noise_seed, sample_steps
        self.plans = 0

    def generator(self) -> torch.Generator:
        """The noise of this plan: a function of (noise seed, episode seed, plan number), so a rollout's actions
        are reproducible in process and through a policy server alike."""
        return torch.Generator(device=self.exported.device).manual_seed(self.noise_key())

    def noise_key(self) -> int:
        return (self.noise_seed * 1_000_003 + self.seed * 7919 + self.plans) % (2**63)

    def chunk(self, frame: np.ndarray, qpos: np.ndarray) -> np.ndarray:
        """Raw (un-normalised) joint targets [K, 14] for one observation."""
        out = self.exported.plan(frame, qpos, self.setup.instruction, self.setup.tier, mode=self.mode,
                                 generator=self.generator(), steps=self.sample_steps)
        self.plans += 1
        return out.actions

    def plan(self, frame, qpos, sim) -> np.ndarray:
        return np.repeat(self.chunk(frame, qpos), self.exported.spec.downsample, axis=0)


# ------------------------------------------------------------------------------------------------ rollouts

class _Scenes:
    """Per-process simulators, renderers and the loaded export, built once and reused across rollouts."""

    def __init__(self, settings: RolloutSettings, exported: Any = None):
        self.settings = settings
        self.exported = exported
        self._sims: dict[str, Any] = {}
        self._ee: dict[str, Any] = {}
        self._renderers: dict[str, Any] = {}
        self._client: Any = None

    def model(self) -> Any:
        if self.exported is None:
            from .export import load_export

            if self.settings.export_dir is None:
                raise ValueError("a model policy needs an export (RolloutSettings.export_dir)")
            self.exported = load_export(self.settings.export_dir, self.settings.params)
        return self.exported

    def scene(self, task: str) -> tuple[Any, Any]:
        from ..sim.aloha import JointSim
        from ..sim.render import FastRenderer

        if task not in self._sims:
            self._sims[task] = JointSim(task)
            h, w = self.settings.tasks[task].image_size
            self._renderers[task] = FastRenderer(self._sims[task].model, h, w)
        return self._sims[task], self._renderers[task]

    def ee_sim(self, task: str) -> Any:
        from ..sim.aloha import EndEffectorSim

        if task not in self._ee:
            self._ee[task] = EndEffectorSim(task)
        return self._ee[task]

    def policy(self, job: Rollout, sim: Any) -> Any:
        s, hold = self.settings, self.settings.hold
        if job.policy in MODEL_POLICIES:
            local = ModelPolicy(self.model(), job.policy, s.tasks[job.task], job.seed, s.noise_seed, s.sample_steps)
            if s.server_url is None:
                return local
            from .remote import PolicyClient, RemotePolicy

            if self._client is None:
                self._client = PolicyClient(s.server_url)
            return RemotePolicy(self._client, local)
        if job.policy == "zero":
            return _ZeroPolicy(hold)
        if job.policy == "random":
            return _RandomPolicy(hold, job.seed, sim)
        if job.policy == "scripted":
            return _ScriptedPolicy(job.task, job.seed, self.ee_sim(job.task))
        raise ValueError(f"unknown policy {job.policy!r}; expected one of {POLICIES}")

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
        if self._client is not None:
            self._client.close()


# action layout [left arm 6, left gripper, right arm 6, right gripper]: the 12 arm joints, in joint_limits order
ARM_ACTION_DIMS = np.array([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12])


def run_rollout(job: Rollout, scenes: _Scenes) -> RolloutResult:
    from dm_control.rl.control import PhysicsError

    from ..sim.aloha import initial_object_poses, joint_limits

    t_start = time.perf_counter()
    setup = scenes.settings.tasks[job.task]
    sim, renderer = scenes.scene(job.task)
    policy = scenes.policy(job, sim)
    qpos = sim.reset(initial_object_poses(job.task, job.seed))
    queue: list[np.ndarray] = []
    frames: list[np.ndarray] = []
    best, steps, plans, planning = 0.0, 0, 0, 0.0
    diverged = None
    arm_limits = joint_limits(sim.model, margin=0.0)
    for t in range(scenes.settings.max_steps):
        frame = None
        if job.record or (not queue and policy.needs_frame):
            frame = renderer.render(sim.data, setup.view)
            if job.record:
                frames.append(frame)
        if not queue:
            t0 = time.perf_counter()
            queue = list(policy.plan(frame, qpos, sim))
            planning += time.perf_counter() - t0
            plans += 1
        action = np.asarray(queue.pop(0), dtype=np.float64)
        if not np.all(np.isfinite(action)):
            diverged = f"non-finite action at step {t}"
            break
        # the arm's controller clamps targets to the joint limits, as a real robot's would
        action[ARM_ACTION_DIMS] = np.clip(action[ARM_ACTION_DIMS], *arm_limits)
        try:
            qpos, reward = sim.step(action)
        except PhysicsError as e:  # an unstable episode is a failed episode, not a failed evaluation
            diverged = f"physics diverged at step {t}: {e}"
            break
        best, steps = max(best, reward), t + 1
        if best >= sim.max_reward:  # success is reaching the max once; the rest of the episode cannot undo it
            break
    return RolloutResult(job.policy, job.task, job.seed, bool(best >= sim.max_reward), float(best), steps, plans,
                         planning, time.perf_counter() - t_start, np.stack(frames) if frames else None, diverged)


_WORKER: dict[str, Any] = {}


def _init_worker(settings: RolloutSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    _WORKER["scenes"] = _Scenes(settings)


def _run_in_worker(job: Rollout) -> RolloutResult:
    return run_rollout(job, _WORKER["scenes"])


def default_workers(n_jobs: int) -> int:
    return max(1, min(os.cpu_count() or 1, n_jobs))


def run_rollouts(jobs: Sequence[Rollout], settings: RolloutSettings, *, workers: int | None = None,
                 progress: bool = True, exported: Any = None,
                 on_result: Callable[[RolloutResult], None] | None = None) -> list[RolloutResult]:
    """Every rollout, in a pool of `workers` processes (default: min(cores, rollouts)); results in job order.

    `workers=1` runs here, reusing `exported` when given (no second copy of the model)."""
    from tqdm.auto import tqdm

    jobs = list(jobs)
    if not jobs:
        return []
    workers = default_workers(len(jobs)) if workers is None else max(1, min(int(workers), len(jobs)))
    bar = tqdm(total=len(jobs), desc="rollouts", unit="ep", disable=not progress, leave=False)
    results: dict[int, RolloutResult] = {}
    try:
        if workers == 1:
            scenes = _Scenes(settings, exported)
            try:
                for i, job in enumerate(jobs):
                    results[i] = run_rollout(job, scenes)
                    _tick(bar, results[i], results, on_result)
            finally:
                scenes.close()
        else:
            import multiprocessing as mp

            threads = settings.threads or max(1, (os.cpu_count() or 1) // workers)
            settings = RolloutSettings(**{**settings.__dict__, "threads": threads})
            # spawn: a forked child would inherit torch's thread pool and a GL context it cannot use
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                     initargs=(settings,)) as pool:
                futures = {pool.submit(_run_in_worker, job): i for i, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    _tick(bar, results[futures[fut]], results, on_result)
    finally:
        bar.close()
    return [results[i] for i in range(len(jobs))]


def _tick(bar: Any, r: RolloutResult, done: dict[int, RolloutResult], on_result: Any) -> None:
    bar.update(1)
    ok = sum(x.success for x in done.values() if x.policy in MODEL_POLICIES)
    n = sum(x.policy in MODEL_POLICIES for x in done.values())
    if n:
        bar.set_postfix_str(f"model {ok}/{n} ok")
    if on_result is not None:
        on_result(r)


def success_rates(results: Sequence[RolloutResult]) -> dict[tuple[str, str], float]:
    """(policy, task) -> fraction of its rollouts that succeeded."""
    out: dict[tuple[str, str], list[bool]] = {}
    for r in results:
        out.setdefault((r.policy, r.task), []).append(r.success)
    return {k: float(np.mean(v)) for k, v in out.items()}


def task_setups(params: Any, exported_or_lineage: Any, tasks: Sequence[str]) -> dict[str, TaskSetup]:
    """For each task, the tier of the model's lineage that holds its demonstrations (matched by the tier's
    source: `sim: aloha, task: <task>`), its camera view and stored frame size."""
    from ..contracts import TierManifest
    from ..sim.aloha import INSTRUCTIONS, TASKS

    lineage = getattr(exported_or_lineage, "lineage", exported_or_lineage)
    root = Path(params.data.root)
    found: dict[str, TaskSetup] = {}
    tiers = sorted(t.name for t in lineage.tiers)
    for tier in tiers:
        manifest = TierManifest.read(root / tier) if TierManifest.exists(root / tier) else None
        source = (manifest.source if manifest is not None and manifest.source else
                  params.tiers[tier].source.model_dump() if tier in params.tiers else {})
        opts = source.get("options") or {}
        task = opts.get("task")
        if opts.get("sim") != "aloha" or task not in TASKS or task in found:
            continue
        views = dict(manifest.views) if manifest is not None else {}
        view = params.data.window.view or (next(iter(views)) if views else (opts.get("cameras") or ["top"])[0])
        size = views.get(view) or opts.get("image_size") or [64, 64]
        found[task] = TaskSetup(task, tier, view, (int(size[0]), int(size[1])), INSTRUCTIONS[task])
    missing = [t for t in tasks if t not in found]
    if missing:
        unknown = [t for t in missing if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown aloha task(s) {unknown}; expected some of {list(TASKS)}")
        raise ValueError(f"the model's lineage has no gym-aloha tier for task(s) {missing} (its tiers: "
                         f"{tiers}): it was never trained on them")
    return {t: found[t] for t in tasks}
