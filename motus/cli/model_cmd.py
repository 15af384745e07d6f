"""`motus model ...`: inspect the network without building real weights."""

from __future__ import annotations

import typer

model_app = typer.Typer(no_args_is_help=True, help="Inspect the Motus network and its presets.")


@model_app.command("info")
def info(preset: str = typer.Option("tiny", help="Model preset: tiny or full."),
         modes: bool = typer.Option(True, help="Also list the five inference modes.")) -> None:
    """Parameter counts per component and the latent geometry, built on the meta device (no memory, no weights)."""
    import torch

    from ..model import MODES, MotusModel, build_config

    try:
        cfg = build_config(preset)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--preset") from None
    with torch.device("meta"):
        model = MotusModel(cfg)
    counts = model.parameter_counts()
    typer.echo(f"preset {cfg.preset}: {cfg.num_layers} joint-attention layers, {cfg.joint_heads} heads x {cfg.joint_head_dim}")
    for name, n in counts.items():
        frozen = " (frozen)" if name in ("vlm", "vae") else ""
        typer.echo(f"  {name:14s} {n / 1e6:10.1f} M{frozen}")
    typer.echo(f"  {'total':14s} {sum(counts.values()) / 1e6:10.1f} M")
    typer.echo(f"sample: {cfg.num_frames} frames {cfg.height}x{cfg.width} -> latents {cfg.latent_shape}; "
               f"actions {cfg.action.chunk} x {cfg.action.action_dim} ({cfg.action.encoder_mode} encoder)")
    if modes:
        for name, m in MODES.items():
            typer.echo(f"  mode {name:5s} video={m.video:8s} action={m.action:8s} {m.description}")
