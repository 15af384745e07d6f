"""The pipeline as a Prefect deployment on a work pool: what a platform team schedules.

The deployment loads `flows/pipeline.py:motus_pipeline` from the project folder (its code, params.yaml and
dvc.yaml travel together); a process pool runs it on the worker's machine, a Kubernetes pool in a pod made
from the pool's base job template (infra/prefect/). The pool is created as a process pool when missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FLOW_ENTRYPOINT = "flows/pipeline.py:motus_pipeline"  # the deployment and `motus pipeline run` start this


async def _ensure_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def deploy_pipeline(root: Path, params_file: Path, *, pool: str, name: str, cron: str | None = None, nproc: int = 1,
                    evaluation: dict[str, Any] | None = None) -> str:
    import asyncio

    from prefect import Flow

    asyncio.run(_ensure_pool(pool))
    flow = Flow.from_source(source=str(root), entrypoint=FLOW_ENTRYPOINT)
    dep_id = flow.deploy(name=name, work_pool_name=pool, build=False, push=False, cron=cron, print_next_steps=False,
                         parameters={"params_file": str(params_file), "root": str(root), "nproc": nproc,
                                     "evaluation": evaluation or {}},
                         description="Motus recipe: tiers -> Stage 1 -> gate -> Stage 2 -> gate -> Stage 3 -> "
                                     "evaluate -> gate", tags=["motus"])
    return str(dep_id)
