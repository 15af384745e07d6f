"""`motus train`: one stage job, through the launcher MOTUS_LAUNCHER names (`local` processes by default,
`kubernetes`: a PyTorchJob on MOTUS_POOL)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


def train(
    stage: Annotated[str, typer.Option("--stage", "-s", help="Stage number (1, 2, 3) or its params.yaml key.")],
    nproc: Annotated[int, typer.Option("--nproc", "-n", min=1, help="Processes (devices) on this machine.")] = 1,
    run_dir: Annotated[Path | None, typer.Option(help="Job folder (checkpoints, metrics, export). Rerunning the "
                                                      "same command resumes from its latest complete checkpoint.")] = None,
    init_from: Annotated[str | None, typer.Option(help="Parent model export to start from (Stage 2/3).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (the schedule keeps the full length).")] = None,
    track: Annotated[bool, typer.Option(help="Log to MLflow (MOTUS_TRACKING_URI).")] = True,
    precision: Annotated[Precision | None, typer.Option(
        help="auto (bf16 on CUDA, fp32 on CPU) | bf16 (fp32 master weights, bf16 autocast) | fp32; "
             "overrides params.yaml's precision.", case_sensitive=False)] = None,
    params: Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml to read.")] = None,
) -> None:
    """Train one stage with DeepSpeed; resumable, tracked in MLflow, exported for the registry."""
    from ..config import ConfigError, get_settings, load_params
    from ..contracts import JobSpec
    from ..train.precision import PrecisionError, preflight
    from ..train.recipe import StageNotReady, check_ready, recipe_from_params

    try:
        settings = get_settings()
        params_file = params or settings.params_file
        p = load_params(params_file)
        recipe = recipe_from_params(p, stage)
        resolved = precision.value if precision else "params.yaml's"
        if settings.launcher == "local":  # a cluster job checks its inputs and devices on its own volume and nodes
            check_ready(p, recipe, Path(p.data.root))
            resolved = preflight(p, recipe.settings, precision.value if precision else None,
                                 f"stages.{recipe.name}")
    except (ConfigError, ValueError, StageNotReady, PrecisionError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if recipe.parent and not init_from:
        typer.echo(f"note: {recipe.name} names parent '{recipe.parent}'; without --init-from it starts from the "
                   f"pretrained bases (the registry will resolve the parent's champion)", err=True)
    spec = JobSpec(stage=recipe.name, run_dir=run_dir or Path("outputs/runs") / recipe.name, params_file=Path(params_file),
                   procs_per_node=nproc, init_from=init_from, max_steps=max_steps, track=track,
                   precision=precision.value if precision else None)
    typer.echo(f"{recipe.name}: {nproc} process(es), {recipe.settings.steps} steps, precision {resolved}, "
               f"run dir {spec.run_dir}")
    run_job(spec, settings, recipe.name)
    typer.echo(f"{recipe.name}: done; export in {spec.run_dir}/export, metrics in {spec.run_dir}/metrics.jsonl")


def run_job(spec, settings, what: str) -> None:
    """Submit through MOTUS_LAUNCHER's launcher and wait; a failure exits non-zero with how to resume."""
    from ..launch.factory import launcher_for
    from ..launch.kubernetes import ClusterError
    from ..launch.launcher import run_to_end

    if spec.track:  # a tracking store that does not answer is said now, not after the job built its model
        from ..track.tracker import check_reachable

        check_reachable(settings.tracking_uri)
    try:
        launcher = launcher_for(settings)
        if launcher.kind != "local":
            typer.echo(f"{what}: submitting through the {launcher.kind} launcher")
        outcome = run_to_end(launcher, spec)
    except (ClusterError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if not outcome.ok:
        typer.echo(f"error: {what} failed ({outcome.message or outcome.state}); rerun the same command to resume "
                   f"from the latest complete checkpoint in {spec.run_dir}/checkpoints", err=True)
        raise typer.Exit(outcome.exit_code if outcome.exit_code > 0 else 1)
