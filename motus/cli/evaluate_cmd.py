"""`motus evaluate TARGET`: every mode of one model, beside its floors and ceiling; recorded for the gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def evaluate(
    target: Annotated[str, typer.Argument(help="models:/NAME/VERSION, models:/NAME@ALIAS, or a local export "
                                               "folder (a run dir's export/).")],
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Closed-loop seeds per task and policy.")] = 4,
    first_seed: Annotated[int, typer.Option(help="First held-out seed (demonstrations use seeds below 1000).")] = 1000,
    tasks: Annotated[str, typer.Option(help="Comma-separated gym-aloha tasks ('' = no closed loop).")]
        = "transfer_cube,insertion",
    modes: Annotated[str, typer.Option(help="Comma-separated modes: wm, idm, vla, joint.")] = "wm,idm,vla,joint",
    workers: Annotated[int | None, typer.Option(min=1, help="Rollout processes (default: min(cores, rollouts)).")]
        = None,
    max_steps: Annotated[int, typer.Option(min=1, help="Episode-length cap in 50 Hz sim steps.")] = 300,
    windows: Annotated[int, typer.Option(min=1, help="Held-out windows per tier for the offline metrics.")] = 8,
    draws: Annotated[int, typer.Option(min=1, help="Seeded noise draws each offline sampled number is averaged "
                                                   "over.")] = 3,
    video_episodes: Annotated[int, typer.Option(min=0, help="Rollout videos kept per model mode and task.")] = 1,
    sample_steps: Annotated[int | None, typer.Option(min=1, help="Euler steps per sample (default: the model's).")]
        = None,
    lpips_weights: Annotated[Path | None, typer.Option(help="Local TorchScript LPIPS network; else no LPIPS.")] = None,
    fvd_weights: Annotated[Path | None, typer.Option(help="Local TorchScript I3D feature network; else no FVD.")]
        = None,
    track: Annotated[bool, typer.Option(help="Record an MLflow evaluation run (MOTUS_TRACKING_URI) and tag the "
                                             "model version with it.")] = True,
    params: Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml to read.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report JSON here.")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
    via_server: Annotated[str | None, typer.Option(help="Drive the closed loop through this policy server "
                                                   "(`motus serve`, http://HOST:PORT): the deployed path. It must "
                                                   "serve the evaluated version.")] = None,
) -> None:
    """Evaluate a model in every mode: world-model PSNR/SSIM, IDM/VLA/joint action error on held-out episodes,
    closed-loop success in gym-aloha, each beside zero/random floors and the scripted ceiling."""
    from ..config import ConfigError, get_settings, load_params
    from ..evaluate import evaluate_model
    from ..evaluate.export import ExportError, check_export
    from ..evaluate.remote import ServerError

    try:
        settings = get_settings()
        p = load_params(params or settings.params_file)
        name = version = None
        if target.startswith("models:/"):
            from ..track.registry import Registry, RegistryError

            try:
                registry = Registry(settings.tracking_uri, p)
                ref = registry.resolve(target)
                export = registry.fetch(ref)
            except RegistryError as e:
                raise ValueError(str(e)) from None
            name, version = ref.name, str(ref.version)
            typer.echo(f"{target} -> {ref.name} v{ref.version} (run {ref.run_id}), export in {export}")
        else:
            export = check_export(target)
        task_list = [t.strip() for t in tasks.split(",") if t.strip()]
        mode_list = [m.strip() for m in modes.split(",") if m.strip()]
        report = evaluate_model(
            p, export, model_name=name, version=version,
            seeds=range(first_seed, first_seed + seeds), tasks=task_list, workers=workers, progress=progress,
            modes=mode_list, max_steps=max_steps, windows_per_tier=windows, draws=draws, video_episodes=video_episodes,
            sample_steps=sample_steps, lpips_weights=lpips_weights, fvd_weights=fvd_weights, echo=typer.echo,
            server_url=via_server)
        if track:
            from ..track.evaluations import record_evaluation

            record_evaluation(report, tracking_uri=settings.tracking_uri, experiment=p.project.name)
    except (ConfigError, ExportError, ValueError, FileNotFoundError, ServerError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(report.summary())
    t = report.timing
    if "rollouts_per_s" in t:
        typer.echo(f"rollouts: {t['rollouts_per_s']:.2f}/s, model plan {1000 * t['policy_plan_seconds']:.0f} ms, "
                   f"{t['sim_steps_per_s']:.0f} sim steps/s")
    if json_out is not None:
        json_out.write_text(report.to_json())
    if report.run_id:
        linked = f"; tagged {name} v{version} motus.evaluation_run" if name else ""
        typer.echo(f"evaluation run {report.run_id}{linked}")
