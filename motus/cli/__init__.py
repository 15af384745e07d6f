"""The `motus` command line: every command is a thin call into the library."""

from __future__ import annotations

import typer

from .config_cmd import config_app
from .data_cmd import data_app
from .evaluate_cmd import evaluate
from .k8s_cmd import k8s_app
from .latent_cmd import latent_app
from .model_cmd import model_app
from .pipeline_cmd import pipeline_app
from .registry_cmd import lineage_app, registry_app
from .runner_cmd import runner_app
from .serve_cmd import serve
from .track_cmd import track_app
from .train_cmd import train

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Motus training platform: data tiers -> Stage 1-3 training -> gated, lineage-tracked models.")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.command()(train)
app.add_typer(latent_app, name="latent-action")
app.command()(evaluate)
app.add_typer(registry_app, name="registry")
app.add_typer(lineage_app, name="lineage")
app.add_typer(k8s_app, name="k8s")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(runner_app, name="runner")
app.add_typer(track_app, name="track")
app.command()(serve)


@app.command()
def demo(seconds: float = typer.Option(5.0, help="How long to train the tiny model."),
         seed: int = typer.Option(0, help="Random seed."),
         out: str = typer.Option("outputs/demo-model", help="Where to save the trained tiny model.")) -> None:
    """Train the tiny Motus on random data for a few seconds and sample all five modes."""
    from pathlib import Path

    from ..demo import run_demo

    run_demo(seconds=seconds, seed=seed, out_dir=Path(out), echo=typer.echo)


def main() -> None:
    from ..contracts import ServiceUnreachable, mask_process_output

    mask_process_output()  # no credential of the environment reaches a terminal, a log or a CI transcript
    try:
        app()
    except ServiceUnreachable as e:  # an outage is one line naming what is down, not a traceback
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
