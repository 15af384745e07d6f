"""Closed-loop evaluation speed, printed as rates and ratios.

    python benchmarks/evaluate.py [--seeds 6] [--export runs/stage3/export --params params.yaml]

1. rollouts/s of the baselines (zero actions, scripted expert; gym-aloha transfer cube, 300-step cap) on
   1 worker and on min(cores, rollouts) workers; ratio = parallel / serial (the pool's speed-up, including
   the spawned workers' start-up).
2. with --export: the model policy's plan latency (one observation -> one action chunk, in vla mode) and
   sim steps per second of model rollouts; ratio = plan latency / the 24 sim steps a chunk drives.
"""

from __future__ import annotations

import argparse
import os
import time

from motus.evaluate.closed_loop import Rollout, RolloutSettings, TaskSetup, run_rollouts, task_setups


def rate(jobs, settings, workers, exported=None) -> tuple[float, list]:
    t0 = time.perf_counter()
    results = run_rollouts(jobs, settings, workers=workers, progress=False, exported=exported)
    return len(jobs) / (time.perf_counter() - t0), results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--export", default=None)
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args()
    seeds = range(1000, 1000 + a.seeds)
    setup = {"transfer_cube": TaskSetup("transfer_cube", "none", "top", (64, 64), "transfer the cube")}
    settings = RolloutSettings(None, None, setup, max_steps=300, hold=3)
    jobs = [Rollout(p, "transfer_cube", s) for p in ("zero", "scripted") for s in seeds]
    serial, _ = rate(jobs, settings, 1)
    workers = min(os.cpu_count() or 1, len(jobs))
    parallel, _ = rate(jobs, settings, workers)
    print(f"baseline rollouts: {serial:.2f}/s on 1 worker, {parallel:.2f}/s on {workers}; ratio {parallel / serial:.2f}")
    if a.export:
        from motus.config import load_params
        from motus.evaluate.export import load_export

        params = load_params(a.params)
        ex = load_export(a.export, params)
        setups = task_setups(params, ex, ["transfer_cube"])
        s = RolloutSettings(str(ex.path), params, setups, max_steps=300, hold=ex.spec.downsample)
        _, results = rate([Rollout("vla", "transfer_cube", x) for x in seeds[:2]], s, 1, ex)
        plans = sum(r.plans for r in results)
        latency = sum(r.policy_seconds for r in results) / plans
        steps_s = sum(r.steps for r in results) / sum(r.seconds for r in results)
        chunk = ex.spec.chunk * ex.spec.downsample
        print(f"model policy: {1000 * latency:.0f} ms per plan ({chunk} sim steps = {chunk / 50:.2f} s of robot "
              f"time; ratio {latency / (chunk / 50):.2f}), {steps_s:.0f} sim steps/s")


if __name__ == "__main__":
    main()
