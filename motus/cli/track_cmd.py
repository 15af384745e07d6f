"""`motus track`: the tracking store as a job sees it. `replay` sends what a job kept in its run folder while the
store did not answer (`tracking-buffer.jsonl`, see `motus.track.outage`) when the job could not wait for it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

track_app = typer.Typer(no_args_is_help=True, help="The tracking store: replay what a job kept while it was down.")


@track_app.command("replay")
def replay(
    run_dir: Annotated[Path, typer.Argument(help="The job's run folder (where tracking-buffer.jsonl is).")],
    tracking_uri: Annotated[str | None, typer.Option(help="The store to send to (default: MOTUS_TRACKING_URI).")]
    = None,
) -> None:
    """Send a run folder's buffered metrics, params, tags, artifacts and run end to its MLflow run, in order.

    Each entry is recorded as sent when it is, so a replay that is interrupted goes on where it stopped when run
    again; the buffer is removed once everything is sent."""
    from ..config import get_settings
    from ..contracts import mask_secrets
    from ..track.outage import replay_buffer
    from ..track.tracker import check_reachable, resolve_tracking_uri

    uri = tracking_uri or get_settings().tracking_uri
    check_reachable(uri)  # down: one line naming it (the CLI's ServiceUnreachable handler), not a minute of retries
    try:
        from mlflow import MlflowClient

        done = replay_buffer(run_dir, MlflowClient(tracking_uri=resolve_tracking_uri(uri)))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if done is None:
        typer.echo(f"{run_dir}: nothing to replay (no tracking-buffer.jsonl)")
        return
    typer.echo(f"{run_dir}: replayed {done.entries} entries ({done.points} metric, param and tag points) into run "
               f"{done.run_id} at {mask_secrets(uri)}")
