"""`evaluate_model`: every mode of one model export, measured beside its floors and ceiling, returned as a
report. Recording it (an MLflow evaluation run linked to the version) is `motus.track.evaluations`'.

Metric names (what the gates in `params.yaml` read):
  eval/success_rate, eval/<task>/success_rate            closed loop, vla mode (mean over tasks / per task)
  eval/joint_success_rate, eval/<task>/joint_success_rate  closed loop, joint mode
  eval/<task>/floor_zero_success_rate, .../floor_random_success_rate, .../ceiling_success_rate (+ means)
  eval/vla_action_mse, eval/idm_action_mse, eval/joint_action_mse, eval/floor_zero_action_mse  (held-out)
  eval/wm_psnr, eval/wm_ssim (+ _floor_copy_, _ceiling_vae_), eval/joint_psnr/ssim, eval/wm_lpips, eval/wm_fvd
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.tier import Tier
from .closed_loop import (
    BASELINES,
    GYM_ALOHA_STEP_LIMIT,
    MODEL_POLICIES,
    Rollout,
    RolloutSettings,
    run_rollouts,
    success_rates,
    task_setups,
)
from .export import load_export
from .metrics import FeatureNet
from .offline import offline_metrics
from .report import EvaluationReport, reproducibility

MODES = ("wm", "idm", "vla", "joint")
DEFAULT_TASKS = ("transfer_cube", "insertion")
FIRST_SEED = 1000  # evaluation seeds start here; the demonstration tiers are rendered from seeds below it
DEFAULT_SEEDS = tuple(range(FIRST_SEED, FIRST_SEED + 4))
_FLOOR_NAMES = {"zero": "floor_zero", "random": "floor_random", "scripted": "ceiling"}


def evaluate_model(params: Any, export_dir: str | Path, *, model_name: str | None = None,
                   version: str | int | None = None,
                   seeds: Sequence[int] = DEFAULT_SEEDS, tasks: Sequence[str] = DEFAULT_TASKS,
                   workers: int | None = None, progress: bool = True, modes: Sequence[str] = MODES,
                   max_steps: int = GYM_ALOHA_STEP_LIMIT, windows_per_tier: int = 8, video_episodes: int = 1,
                   sample_steps: int | None = None, draws: int = 3, lpips_weights: str | Path | None = None,
                   fvd_weights: str | Path | None = None, echo: Any = None,
                   server_url: str | None = None) -> EvaluationReport:
    """Evaluate a Motus export in every mode; see the module docstring for what is measured.

    `model_name` and `version` name the registered version the report is about. `video_episodes`: rollouts per
    (model mode, task) whose video is kept. `seeds` must be held out (>= 1000: the demonstration tiers use
    seeds below). `echo` gets progress lines (e.g. `print`). `server_url`: the closed loop's model policies ask
    this policy server (`motus serve`) for their plans; it must be serving this export.
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown evaluation mode(s) {bad}; expected some of {list(MODES)}")
    seeds = [int(s) for s in seeds]
    if any(s < FIRST_SEED for s in seeds):
        raise ValueError(f"evaluation seeds must be >= {FIRST_SEED} (held out from the demonstration tiers), "
                         f"got {[s for s in seeds if s < FIRST_SEED]}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    say = echo or (lambda _msg: None)
    t_start = time.perf_counter()
    exported = load_export(export_dir, params)
    lineage = exported.lineage
    tiers = sorted(t.name for t in lineage.tiers)
    metrics: dict[str, float] = {}
    not_reported: dict[str, str] = {}
    timing: dict[str, float] = {}
    offline_info: dict[str, Any] = {}
    wm_frames = None

    # --- held-out windows: wm, idm, vla/joint offline action error ------------------------------------
    lpips = FeatureNet(lpips_weights, "LPIPS") if lpips_weights else None
    fvd = FeatureNet(fvd_weights, "FVD") if fvd_weights else None
    for name, net in (("eval/wm_lpips", lpips), ("eval/wm_fvd", fvd)):
        if net is None and "wm" in modes:
            not_reported[name] = "no local feature-network weights given (never computed with stand-ins)"
    if set(modes) & set(MODES):
        say(f"held-out windows of {tiers} ({windows_per_tier} per tier)")
        t0 = time.perf_counter()
        off = offline_metrics(exported, params, tiers, per_tier=windows_per_tier, seed=params.project.seed,
                              draws=draws, sample_steps=sample_steps, lpips=lpips, fvd=fvd, progress=progress)
        timing["offline_seconds"] = time.perf_counter() - t0
        keep = _offline_keys(modes)
        metrics.update({k: v for k, v in off.metrics.items() if any(k.startswith(p) for p in keep)})
        offline_info = {"windows": off.windows, "heldout_episodes": off.episodes, "per_window": off.per_window}
        wm_frames = off.sample_frames if "wm" in modes else None

    # --- closed loop: model policies beside floors and ceiling on the same seeds -------------------------
    policies = [m for m in MODEL_POLICIES if m in modes]
    rollouts: list[dict[str, Any]] = []
    videos: dict[str, np.ndarray] = {}
    if policies and tasks:
        setups = task_setups(params, exported, tasks)
        if server_url is not None:
            from ..data.tier import export_hash
            from .remote import PolicyClient, check_serves

            client = PolicyClient(server_url)
            try:
                meta = check_serves(client, export_hash(exported.path))
            finally:
                client.close()
            say(f"closed loop through {server_url} ({meta['serving']['name']} v{meta['serving']['version']})")
        settings = RolloutSettings(str(exported.path), params, setups, max_steps=max_steps,
                                   hold=exported.spec.downsample, sample_steps=sample_steps,
                                   noise_seed=params.project.seed, server_url=server_url)
        jobs = [Rollout(p, t, s, record=(p in MODEL_POLICIES and i < video_episodes))
                for t in tasks for p in (*policies, *BASELINES) for i, s in enumerate(seeds)]
        n = workers if workers is not None else min(os.cpu_count() or 1, len(jobs))
        say(f"{len(jobs)} rollouts ({', '.join(tasks)}; seeds {seeds[0]}..{seeds[-1]}; cap {max_steps} steps) "
            f"on {n} worker(s)")
        t0 = time.perf_counter()
        results = run_rollouts(jobs, settings, workers=n, progress=progress, exported=exported)
        wall = time.perf_counter() - t0
        rates = success_rates(results)
        for task in tasks:
            for p in policies:
                key = "success_rate" if p == "vla" else f"{p}_success_rate"
                metrics[f"eval/{task}/{key}"] = rates[(p, task)]
            for p in BASELINES:
                metrics[f"eval/{task}/{_FLOOR_NAMES[p]}_success_rate"] = rates[(p, task)]
        for key in {k.split("/", 2)[2] for k in metrics if k.count("/") == 2 and k.endswith("success_rate")}:
            metrics[f"eval/{key}"] = float(np.mean([metrics[f"eval/{t}/{key}"] for t in tasks]))
            # the episodes behind each rate: a statistical gate rule judges k of n, not the bare fraction
            metrics[f"eval/{key}_n"] = float(len(seeds) * len(tasks))
            for t in tasks:
                metrics[f"eval/{t}/{key}_n"] = float(len(seeds))
        model_runs = [r for r in results if r.policy in MODEL_POLICIES]
        plans = sum(r.plans for r in model_runs)
        timing.update(closed_loop_seconds=wall, rollouts_per_s=len(results) / wall,
                      policy_plan_seconds=sum(r.policy_seconds for r in model_runs) / max(1, plans),
                      sim_steps_per_s=sum(r.steps for r in results) / wall)
        rollouts = [r.summary() for r in results]
        videos = {f"{r.policy}_{r.task}_s{r.seed}.mp4": r.frames for r in results if r.frames is not None}
    elif not tasks:
        not_reported["eval/success_rate"] = "no closed-loop tasks requested"

    timing["total_seconds"] = time.perf_counter() - t_start
    settings = {"modes": list(modes), "tasks": list(tasks), "seeds": seeds, "max_steps": max_steps,
                "hold_steps": exported.spec.downsample, "sample_steps": sample_steps or exported.cfg.flow.inference_steps,
                "windows_per_tier": windows_per_tier, "draws": draws, "workers": workers, "fps": 50,
                "lpips_weights": str(lpips_weights) if lpips_weights else None,
                "fvd_weights": str(fvd_weights) if fvd_weights else None, "via_server": server_url}
    root = Path(params.data.root)
    evaluated = {t: Tier(root / t).content_hash if (root / t / "manifest.json").exists() else "not built"
                 for t in tiers}  # the tiers as read now (the lineage says what the model trained on)
    report = EvaluationReport(
        metrics=metrics, export_dir=str(exported.path), model_name=model_name,
        version=None if version is None else str(version),
        settings=settings, environment=reproducibility(settings, evaluated, params.project.seed),
        rollouts=rollouts, offline=offline_info, not_reported=not_reported,
        lineage={k: v for k, v in lineage.to_json().items() if k in ("stage", "registered_model", "config_hash",
                                                                      "parent", "tiers", "run_id")},
        timing=timing, videos=videos, wm_frames=wm_frames)

    return report


def _offline_keys(modes: Sequence[str]) -> list[str]:
    keys = []
    if "wm" in modes:
        keys += ["eval/wm_"]
    if "idm" in modes:
        keys += ["eval/idm_"]
    if "vla" in modes:
        keys += ["eval/vla_"]
    if "joint" in modes:
        keys += ["eval/joint_"]
    if {"idm", "vla", "joint"} & set(modes):
        keys += ["eval/floor_zero_action_mse", "eval/untrained_action_mse"]
    return keys
