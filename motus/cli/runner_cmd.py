"""`motus runner`: the warm runners that local CPU jobs are forked from (see motus.launch.runner)."""

from __future__ import annotations

import typer

runner_app = typer.Typer(no_args_is_help=True, help="The warm runners local CPU jobs start from.")


def _runners():
    from ..config import ConfigError, get_settings
    from ..launch.runner import Runners

    try:
        settings = get_settings()
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    return Runners(settings.runner_dir, settings.runner_idle_s)


@runner_app.command("list")
def list_runners() -> None:
    """The runners alive in MOTUS_RUNNER_DIR: pid and socket (each exits by itself once idle)."""
    runners = _runners()
    alive = runners.running()
    if not alive:
        typer.echo(f"no runner in {runners.folder}")
    for pid, sock in alive:
        typer.echo(f"{pid}  {sock}  (log: {sock.with_suffix('.log')})")


@runner_app.command()
def stop() -> None:
    """Stop every runner in MOTUS_RUNNER_DIR; each finishes the jobs it is running first."""
    runners = _runners()
    pids = runners.stop()
    typer.echo(f"stopped {len(pids)} runner(s) in {runners.folder}" + (f": {', '.join(map(str, pids))}" if pids else ""))
