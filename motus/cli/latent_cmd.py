"""`motus latent-action ...`: optical flow features, the latent-action VAE job, and the Stage 2 feature."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .train_cmd import Precision

latent_app = typer.Typer(no_args_is_help=True, help="Latent actions from optical flow: flow -> train -> export.")

ParamsOption = Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml to read.")]
TiersArg = Annotated[list[str] | None, typer.Argument(help="Tiers (default: latent_action.tiers or the Stage 2 tiers).")]


def _load(params: Path | None):
    from ..config import ConfigError, get_settings, load_params

    try:
        settings = get_settings()
        path = params or settings.params_file
        return load_params(path), path
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None


@latent_app.command()
def flow(tiers: TiersArg = None, params: ParamsOption = None) -> None:
    """Flow images between adjacent frames of each tier (features/flow/<tier>), with progress."""
    from tqdm import tqdm

    from ..data.latent_actions import build_flow_feature, lam_tiers

    p, _ = _load(params)
    for name in tiers or lam_tiers(p):
        if name not in p.tiers:
            typer.echo(f"error: unknown tier '{name}'", err=True)
            raise typer.Exit(2)
        bar = tqdm(desc=f"flow {name}", unit="ep")
        m = build_flow_feature(p, name, progress=lambda bar=bar: bar.update(1))
        bar.close()
        typer.echo(f"flow/{name}: {m.episodes} episodes, content {m.content_hash[:12]}")


@latent_app.command()
def train(nproc: Annotated[int, typer.Option("--nproc", "-n", min=1)] = 1,
          run_dir: Annotated[Path, typer.Option(help="Job folder; rerun to resume.")] = Path("outputs/runs/latent-action"),
          max_steps: Annotated[int | None, typer.Option()] = None,
          track: Annotated[bool, typer.Option(help="Log to MLflow.")] = True,
          precision: Annotated[Precision | None, typer.Option(
              help="auto | bf16 | fp32; overrides latent_action.precision / precision.", case_sensitive=False)] = None,
          params: ParamsOption = None) -> None:
    """Train the latent-action VAE (DeepSpeed, checkpoints, MLflow) on the flow features."""
    from ..config import get_settings
    from ..contracts import JobSpec
    from ..data.latent_actions import FLOW, features_root, lam_tiers
    from ..train.precision import PrecisionError, preflight
    from .train_cmd import run_job

    p, path = _load(params)
    try:
        preflight(p, p.latent_action, precision.value if precision else None, "latent_action")
    except PrecisionError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    missing = [t for t in lam_tiers(p) if not (features_root(p) / FLOW / t / "manifest.json").exists()]
    if missing:
        typer.echo(f"error: no flow features for {missing}; run `motus latent-action flow` first", err=True)
        raise typer.Exit(1)
    spec = JobSpec(stage="latent-action", run_dir=run_dir, params_file=Path(path), procs_per_node=nproc,
                   max_steps=max_steps, track=track, precision=precision.value if precision else None)
    run_job(spec, get_settings(), "the latent-action job")
    typer.echo(f"latent-action: done; export in {run_dir}/export")


@latent_app.command()
def export(tiers: TiersArg = None,
           model: Annotated[Path, typer.Option(help="The trained VAE export (the DVC stage reads models/latent-action, "
                                                    "which the pipeline publishes).")] = Path("models/latent-action"),
           params: ParamsOption = None) -> None:
    """Write `latent_actions` [T-1, 14] per episode for each tier (features/latent_actions/<tier>)."""
    from ..data.latent_actions import export_latent_actions, lam_tiers

    p, _ = _load(params)
    if not (model / "config.json").exists() and not any(model.glob("*.json")):
        typer.echo(f"error: '{model}' is not a latent-action VAE export (run `motus latent-action train`)", err=True)
        raise typer.Exit(1)
    for name in tiers or lam_tiers(p):
        m = export_latent_actions(p, model, name)
        typer.echo(f"latent_actions/{name}: {m.episodes} episodes, content {m.content_hash[:12]}")
