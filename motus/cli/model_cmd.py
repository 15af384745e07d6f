"""`motus model ...`: inspect the network and size its training without building real weights."""

from __future__ import annotations

import json

import typer

model_app = typer.Typer(no_args_is_help=True, help="Inspect the Motus network and its presets.")


def _config(preset: str, geometry: str | None):
    """The preset's validated config, re-shaped to a named geometry; bad names are option errors."""
    from ..model import build_config
    from ..model.presets import geometry_names

    try:
        cfg = build_config(preset)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--preset") from None
    if geometry is not None:
        if geometry not in geometry_names():
            raise typer.BadParameter(f"unknown geometry '{geometry}'; expected one of {geometry_names()}",
                                     param_hint="--geometry")
        cfg.apply_geometry(geometry)
        try:
            cfg.validate()
        except ValueError as e:
            raise typer.BadParameter(f"geometry '{geometry}' does not suit preset '{preset}': {e}",
                                     param_hint="--geometry") from None
    return cfg


def _geometry(cfg) -> dict:
    from ..model.tokens import DEFAULT_INSTRUCTION_TOKENS, STAGES, stage_tokens

    return {
        "name": cfg.geometry, "frames": cfg.num_frames, "latent_frames": cfg.latent_frames,
        "height": cfg.height, "width": cfg.width, "latent_shape": list(cfg.latent_shape),
        "chunk": cfg.action.chunk, "ratio": cfg.video_action_ratio, "downsample": cfg.downsample,
        "text_len": cfg.text_len, "vlm_image_size": cfg.vlm_image_size,
        "instruction_tokens": DEFAULT_INSTRUCTION_TOKENS,
        # tokens per sample each stage's training forward sees (understanding: image + 2 specials + instruction)
        "tokens": {f"stage{s}": {**vars(t), "joint": t.joint}
                   for s in STAGES for t in [stage_tokens(cfg, s)]},
    }


@model_app.command("info")
def info(preset: str = typer.Option("tiny", help="Model preset: tiny, small or full."),
         geometry: str = typer.Option(None, help="Named sample geometry (robotwin, ac-one, tiny); "
                                                 "default: the preset's own."),
         modes: bool = typer.Option(True, help="Also list the five inference modes."),
         as_json: bool = typer.Option(False, "--json",
                                      help="One JSON object: geometry and parameter counts.")) -> None:
    """Parameter counts per component and the sample geometry, built on the meta device (no weights)."""
    from ..model import MODES
    from ..model.tokens import STAGES
    from ..train.memory import parameter_counts, trained_experts

    cfg = _config(preset, geometry)
    counts = parameter_counts(cfg)
    if as_json:
        params = {**counts, "total": sum(counts.values()),
                  "trainable": {f"stage{s}": sum(counts[e] for e in trained_experts(s)) for s in STAGES}}
        typer.echo(json.dumps({"preset": cfg.preset, "layers": cfg.num_layers, "heads": cfg.joint_heads,
                               "head_dim": cfg.joint_head_dim, "geometry": _geometry(cfg),
                               "parameters": params}, indent=2))
        return
    typer.echo(f"preset {cfg.preset}: {cfg.num_layers} joint-attention layers, "
               f"{cfg.joint_heads} heads x {cfg.joint_head_dim}")
    for name, n in counts.items():
        frozen = " (frozen)" if name in ("vlm", "vae") else ""
        typer.echo(f"  {name:14s} {n / 1e6:10.1f} M{frozen}")
    typer.echo(f"  {'total':14s} {sum(counts.values()) / 1e6:10.1f} M")
    g = _geometry(cfg)
    typer.echo(f"geometry {g['name']}: {cfg.num_frames} frames ({cfg.latent_frames} latent) at "
               f"{cfg.height}x{cfg.width}, chunk {cfg.action.chunk}, ratio {cfg.video_action_ratio}, "
               f"downsample {cfg.downsample}, text_len {cfg.text_len}")
    for stage, t in g["tokens"].items():
        typer.echo(f"  tokens {stage}: video {t['video']}, action {t['action']}, "
                   f"understanding {t['understanding']}, text {t['text']} (joint {t['joint']})")
    typer.echo(f"sample: {cfg.num_frames} frames {cfg.height}x{cfg.width} -> latents {cfg.latent_shape}; "
               f"actions {cfg.action.chunk} x {cfg.action.action_dim} ({cfg.action.encoder_mode} encoder)")
    if modes:
        for name, m in MODES.items():
            typer.echo(f"  mode {name:5s} video={m.video:8s} action={m.action:8s} {m.description}")


@model_app.command("memory")
def memory(
    preset: str = typer.Option("full", help="Model preset: tiny, small or full."),
    geometry: str = typer.Option(None, help="Named sample geometry; default: the preset's own."),
    stage: int = typer.Option(3, help="Training stage: 1, 2 or 3."),
    batch_size: int = typer.Option(1, help="Samples per device (micro batch)."),
    zero_stage: int = typer.Option(2, help="DeepSpeed ZeRO stage: 0, 1, 2 or 3."),
    offload: bool = typer.Option(False, "--offload", help="Offload the optimizer (states, master copy, "
                                                         "gradient partition) to the CPU; needs ZeRO >= 1."),
    world_size: int = typer.Option(1, help="Data-parallel devices ZeRO partitions over."),
    activation_checkpointing: bool = typer.Option(True, help="Recompute each joint layer in the backward."),
    precision: str = typer.Option("bf16", help="bf16 (fp32 weights + bf16 autocast) or fp32."),
    pre_encoded_text: bool = typer.Option(True, help="T5 embeddings pre-encoded (no T5 on the device)."),
    instruction_tokens: int = typer.Option(32, help="Instruction length in VLM tokens."),
    device_memory: float = typer.Option(80.0, help="Device memory in GB (GiB, as nvidia-smi reports it)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object with the breakdown and the verdict."),
) -> None:
    """Estimate per-device GPU memory of one training step; exit 1 when it does not fit --device-memory."""
    from ..model.tokens import STAGES
    from ..train.memory import PRECISIONS, ZERO_STAGES, GiB, check_fits, estimate_training_memory

    if stage not in STAGES:
        raise typer.BadParameter(f"unknown stage {stage}; expected one of {list(STAGES)}",
                                 param_hint="--stage")
    if zero_stage not in ZERO_STAGES:
        raise typer.BadParameter(f"unknown ZeRO stage {zero_stage}; expected one of {list(ZERO_STAGES)}",
                                 param_hint="--zero-stage")
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"unknown precision '{precision}'; expected one of {list(PRECISIONS)}",
                                 param_hint="--precision")
    if offload and zero_stage == 0:
        raise typer.BadParameter("offload needs ZeRO stage >= 1 (it is a ZeRO feature)",
                                 param_hint="--offload")
    for name, value in (("--batch-size", batch_size), ("--world-size", world_size)):
        if value < 1:
            raise typer.BadParameter(f"must be >= 1, got {value}", param_hint=name)
    if device_memory <= 0:
        raise typer.BadParameter(f"must be > 0, got {device_memory}", param_hint="--device-memory")
    cfg = _config(preset, geometry)
    est = estimate_training_memory(
        cfg, stage=stage, batch_size=batch_size, zero_stage=zero_stage, offload=offload,
        world_size=world_size, activation_checkpointing=activation_checkpointing, precision=precision,
        pre_encoded_text=pre_encoded_text, instruction_tokens=instruction_tokens)
    available = int(device_memory * GiB)
    try:
        check_fits(est, available)
        problem = None
    except ValueError as e:
        problem = str(e)
    if as_json:
        typer.echo(json.dumps({**est.to_dict(), "device_bytes": available, "fits": problem is None,
                               "message": problem}, indent=2))
    else:
        _print_estimate(est, available)
    if problem is not None:
        typer.echo(problem, err=True)
        raise typer.Exit(1)


def _print_estimate(est, available: int) -> None:
    from ..train.memory import GiB

    def gb(x: int) -> str:
        return f"{x / GiB:8.2f} GiB"

    p = est.parameters
    typer.echo(f"{est.preset} Stage {est.stage}: {est.settings()}, {est.precision}")
    typer.echo("  tokens per sample: " + ", ".join(f"{k} {v}" for k, v in est.tokens.items()))
    typer.echo(f"  trainable weights (fp32)      {gb(est.trainable_weights_bytes)}  "
               f"{p['trainable'] / 1e9:.3f} B params")
    frozen = ", ".join(f"{k} {v / GiB:.2f}" for k, v in est.frozen_weights.items())
    typer.echo(f"  frozen weights                {gb(est.frozen_weights_bytes)}  ({frozen} GiB)")
    typer.echo(f"  DeepSpeed fp32 master copy    {gb(est.master_weights_bytes)}")
    typer.echo(f"  gradients (fp32)              {gb(est.gradients_bytes)}")
    typer.echo(f"  optimizer states (AdamW)      {gb(est.optimizer_states_bytes)}")
    typer.echo(f"  activations                   {gb(est.activations_bytes)}  (checkpointed "
               f"{est.activations_checkpointed_bytes / GiB:.2f}, without checkpointing "
               f"{est.activations_full_bytes / GiB:.2f} GiB)")
    typer.echo(f"  autocast bf16 weight copies   {gb(est.autocast_weight_copies_bytes)}")
    typer.echo(f"  workspace and allowances      {gb(est.workspace_bytes)}")
    for name, v in est.phases.items():
        mark = "  <- peak" if name == est.peak_phase else ""
        typer.echo(f"  phase {name:22s}  {gb(v)}{mark}")
    if est.host_bytes:
        typer.echo(f"  host memory for the offloaded optimizer: {est.host_bytes / GiB:.1f} GiB")
    verdict = "fits" if est.total_bytes <= available else "does NOT fit"
    typer.echo(f"  total per device              {gb(est.total_bytes)}  of {available / GiB:.1f} GiB: "
               f"{verdict}")
    typer.echo("assumptions:")
    for a in est.assumptions:
        typer.echo(f"  - {a}")
