"""The Motus pipeline as one Prefect flow: tiers -> flow -> latent actions -> Stage 1 -> gate -> Stage 2 -> gate
-> Stage 3 -> evaluate -> gate. Each step is a Prefect task that calls `motus.pipeline` (which calls the rooms);
this file only says the order, the retries and where the report goes.

Retries are for infrastructure only (a job killed from outside, a lost connection): a bad config, a job that
raised or a failed gate fails the same way every time, so it is not retried; nor is an infrastructure failure
that happened the same way twice in a row (`RetryGuard`).

The flow is async on purpose: a synchronous flow waits ~1 s at exit for its heartbeat thread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from motus.contracts import mask_process_output
from motus.pipeline.errors import RetryGuard
from motus.pipeline.pipeline import GateFailed, Pipeline, is_infrastructure_error
from motus.pipeline.report import summary_dict, write_report

_GUARD = RetryGuard()


def _retry_infrastructure(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the failed task's exception is what we classify
        again, why = _GUARD.retry(str(task_run.id), e)
        if is_infrastructure_error(e):
            print(f"{task_run.name}: {why}")
        return again
    return False


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_infrastructure, cache_policy=NO_CACHE)
def step(pipe: Pipeline, name: str) -> str:
    return pipe.run_step(name).status


@flow(name="motus-pipeline", log_prints=True, validate_parameters=True)
async def motus_pipeline(params_file: str = "params.yaml", root: str | None = None, from_step: str | None = None,
                         until_step: str | None = None, nproc: int = 1,
                         evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the recipe; steps whose content key already has a finished run are reused, not rerun."""
    # a worker runs this flow in a process of its own, whose output is the worker's log: mask it as the CLI
    # masks its own (MLflow prints every run's URL, user and password included, on stdout)
    mask_process_output()
    t0 = time.perf_counter()
    pipe = Pipeline(params_file, root=Path(root) if root else None, nproc=nproc, evaluation=evaluation)
    selected = pipe.select(from_step, until_step)
    pipe.resolve_before(selected[0])
    stopped = error = None
    try:
        for s in selected:
            step.with_options(name=s.name, task_run_name=s.name)(pipe, s.name)
    except GateFailed as e:
        stopped, error = "gate", str(e)
    except BaseException as e:
        stopped, error = "error", f"{type(e).__name__}: {e}"
        raise
    finally:
        report = summary_dict(pipe, time.perf_counter() - t0, stopped, error)
        write_report(pipe, report)
    print(json.dumps({"status": report["status"], "champions": report["champions"]}))
    return report
