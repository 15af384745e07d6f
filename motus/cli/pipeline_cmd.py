"""`motus pipeline plan | run`: the whole recipe as one Prefect flow, rerunning only what changed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

pipeline_app = typer.Typer(no_args_is_help=True, help="Plan and run the recipe: tiers -> Stage 1-3 -> gates -> champion.")

ParamsOption = Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml of the project (its folder is the "
                                                                         "project root: dvc.yaml, data/, outputs/).")]
FromOption = Annotated[str | None, typer.Option("--from", help="First step to run; earlier steps must be cached.")]
UntilOption = Annotated[str | None, typer.Option("--until", help="Last step to run.")]
SeedsOption = Annotated[int | None, typer.Option("--eval-seeds", help="Closed-loop seeds per task in the evaluate step.")]


def _evaluation(seeds: int | None) -> dict:
    return {} if seeds is None else {"seeds": seeds}


def _pipeline(params: Path | None, nproc: int = 1, evaluation: dict | None = None):
    from ..config import ConfigError
    from ..pipeline import Pipeline, PipelineError

    try:
        root = params.resolve().parent if params else Path.cwd()
        return Pipeline(params, root=root, nproc=nproc, evaluation=evaluation)
    except (ConfigError, PipelineError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@pipeline_app.command()
def plan(params: ParamsOption = None, from_step: FromOption = None, until_step: UntilOption = None,
         eval_seeds: SeedsOption = None,
         as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Every step: cached or to run, and WHY (the code file, config key or input hash that changed)."""
    from ..pipeline import PipelineError
    from ..pipeline.report import print_plan

    pipe = _pipeline(params, evaluation=_evaluation(eval_seeds))
    try:
        rows = pipe.plan(from_step, until_step)
    except PipelineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    else:
        print_plan(rows, params=pipe.params)


def _load_flow(root: Path) -> Any:
    """The Prefect flow, started by entrypoint as a deployment starts it (the CLI sits below `flows/` and never
    imports it): the project's own `flows/pipeline.py` when it has one, else the one installed with motus."""
    import importlib.util

    from prefect.flows import load_flow_from_entrypoint

    from ..pipeline.deploy import FLOW_ENTRYPOINT

    file, _, name = FLOW_ENTRYPOINT.partition(":")
    path = root / file
    if not path.is_file():
        found = importlib.util.find_spec(file.removesuffix(".py").replace("/", "."))
        if found is None or found.origin is None:
            raise typer.BadParameter(f"no {file} in {root} and none installed with motus")
        path = Path(found.origin)
    return load_flow_from_entrypoint(f"{path}:{name}")


def _check_profile(profile: str) -> None:
    from ..config import get_settings

    s = get_settings()
    if profile == "local":
        os.environ.pop("PREFECT_API_URL", None)  # Prefect's ephemeral mode: no server to run
        return
    missing = []
    if not s.tracking_uri.startswith(("http://", "https://")):
        missing.append(f"MOTUS_TRACKING_URI must be an MLflow server (is {s.tracking_uri})")
    if not os.environ.get("PREFECT_API_URL"):
        missing.append("PREFECT_API_URL must point at the Prefect server")
    if "://" not in s.data_remote:
        missing.append(f"MOTUS_DATA_REMOTE must be an object store URL such as s3://bucket/dvc (is {s.data_remote})")
    if missing:
        typer.echo("error: the production profile needs its services:\n  " + "\n  ".join(missing), err=True)
        raise typer.Exit(2)


@pipeline_app.command()
def run(params: ParamsOption = None, from_step: FromOption = None, until_step: UntilOption = None,
        profile: Annotated[str | None, typer.Option(
            help="local: ephemeral Prefect, SQLite MLflow, local DVC remote. production: the servers named by "
                 "PREFECT_API_URL and MOTUS_*. Default: MOTUS_PROFILE (local).")] = None,
        nproc: Annotated[int, typer.Option("--nproc", "-n", min=1, help="Processes per training job.")] = 1,
        eval_seeds: SeedsOption = None) -> None:
    """Run the recipe as a Prefect flow; cached steps are reused, a killed stage resumes from its checkpoint."""
    import asyncio

    from ..pipeline.report import REPORT, print_summary

    if profile is None:
        from ..config import ConfigError, get_settings

        try:
            profile = get_settings().profile
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    if profile not in ("local", "production"):
        typer.echo(f"error: --profile must be local or production, not {profile}", err=True)
        raise typer.Exit(2)
    os.environ["MOTUS_PROFILE"] = profile
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The local profile's temporary Prefect server migrates a fresh SQLite database before it answers; on a busy
    # 2-core machine that took longer than Prefect's 20 s allowance (CI: "Timed out while attempting to connect
    # to ephemeral Prefect API server"). A slow start is not a failure; a server that never answers still is.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    _check_profile(profile)
    pipe = _pipeline(params)  # validates the params and the step names before Prefect starts
    _valid_steps(pipe, from_step, until_step)

    motus_pipeline = _load_flow(pipe.root)
    failure = None
    try:
        asyncio.run(motus_pipeline(params_file=str(pipe.params_file), root=str(pipe.root), from_step=from_step,
                                   until_step=until_step, nproc=nproc, evaluation=_evaluation(eval_seeds)))
    except Exception as e:  # noqa: BLE001 - reported below with the summary
        failure = f"{type(e).__name__}: {e}"
    report_file = pipe.out_dir / REPORT
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    if report is not None:
        print_summary(report)
    if failure:
        typer.echo(f"error: the pipeline failed: {failure}", err=True)
        raise typer.Exit(1)
    if report and report["status"] != "completed":
        raise typer.Exit(3)


def _valid_steps(pipe, from_step, until_step) -> bool:
    from ..pipeline import PipelineError

    try:
        pipe.select(from_step, until_step)
    except PipelineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    return True


@pipeline_app.command()
def steps(params: ParamsOption = None) -> None:
    """The steps of the recipe in order, with what each depends on."""
    pipe = _pipeline(params)
    for s in pipe.steps:
        typer.echo(f"{s.name:<34} {s.kind:<15} after: {', '.join(s.deps) or '-'}")


@pipeline_app.command()
def deploy(params: ParamsOption = None,
           pool: Annotated[str, typer.Option(help="Prefect work pool the runs go to (created as a process pool if "
                                                  "missing; on a cluster use a kubernetes pool, see infra/).")] = "motus-process",
           name: Annotated[str, typer.Option(help="Deployment name.")] = "recipe",
           cron: Annotated[str | None, typer.Option(help="Schedule, e.g. '0 3 * * *' (none: run on demand).")] = None,
           nproc: Annotated[int, typer.Option("--nproc", "-n", min=1)] = 1,
           eval_seeds: SeedsOption = None) -> None:
    """Register the pipeline with the Prefect server (PREFECT_API_URL) as a deployment on a work pool."""
    if not os.environ.get("PREFECT_API_URL"):
        typer.echo("error: PREFECT_API_URL is not set: a deployment lives on a Prefect server "
                   "(`prefect server start`, then export PREFECT_API_URL=http://127.0.0.1:4200/api)", err=True)
        raise typer.Exit(2)
    pipe = _pipeline(params)
    from ..pipeline.deploy import deploy_pipeline

    try:
        dep_id = deploy_pipeline(pipe.root, pipe.params_file, pool=pool, name=name, cron=cron, nproc=nproc,
                                 evaluation=_evaluation(eval_seeds))
    except Exception as e:  # noqa: BLE001 - the server's answer, in one line
        typer.echo(f"error: could not deploy to {os.environ['PREFECT_API_URL']}: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"deployment motus-pipeline/{name} ({dep_id}) on work pool '{pool}'"
               + (f", schedule '{cron}'" if cron else ", on demand"))
    typer.echo(f"start a worker: prefect worker start --pool {pool}\n"
               f"run it now:     prefect deployment run motus-pipeline/{name}")
