"""`motus demo` until the pipeline exists: train the tiny model briefly on random data, then sample every mode."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .model import MODES, MotusModel, build_config


def run_demo(seconds: float = 5.0, seed: int = 0, out_dir: Path | None = Path("outputs/demo-model"),
             echo: Callable[[str], None] = print) -> dict:
    torch.manual_seed(seed)
    cfg = build_config("tiny")
    model = MotusModel(cfg)
    counts = model.parameter_counts()
    echo("built the tiny Motus: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + " parameters")

    g = torch.Generator().manual_seed(seed)
    b = 4
    frames = torch.rand(b, 3, cfg.num_frames, cfg.height, cfg.width, generator=g) * 2 - 1
    latents = model.vae.encode(frames)
    echo(f"encoded {b} random clips {tuple(frames.shape[1:])} with the Wan 2.2 VAE -> latents {tuple(latents.shape[1:])}")
    instructions = ["pick up the cube", "open the drawer", "insert the peg", "fold the towel"]
    und = model.encode_understanding(((frames[:, :, 0] + 1) / 2), instructions)
    echo(f"ran the frozen VLM once: {und.features.shape[1]} tokens x {und.features.shape[2]} (padding masked)")
    text = torch.randn(b, 8, cfg.video["text_dim"], generator=g)  # stands in for pre-encoded T5 features
    actions = torch.randn(b, cfg.action.chunk, cfg.action.action_dim, generator=g)
    state = torch.randn(b, cfg.action.state_dim, generator=g)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, betas=(0.9, 0.95),
                            weight_decay=0.01)
    start, step, first, last = time.perf_counter(), 0, None, None
    while time.perf_counter() - start < seconds:
        out = model.training_loss(latents, text, actions, state, und)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        step += 1
        first = first if first is not None else out["loss"].item()
        last = out["loss"].item()
        if step % 25 == 0:
            echo(f"  step {step:4d}  loss {last:.4f}  video {out['video_loss'].item():.4f}  "
                 f"action {out['action_loss'].item():.4f}")
    elapsed = time.perf_counter() - start
    echo(f"trained {step} steps in {elapsed:.1f}s ({step / elapsed:.1f} steps/s): loss {first:.4f} -> {last:.4f}")

    model.eval()
    results = {}
    for name, mode in MODES.items():
        t0 = time.perf_counter()
        r = model.sample(name, latents, text, actions=actions, state=state, understanding=und,
                         generator=torch.Generator().manual_seed(seed))
        parts = []
        if r.video_latents is not None:
            video = model.vae.decode(r.video_latents)
            parts.append(f"video {mode.video} -> frames {tuple(video.shape[1:])}")
        else:
            parts.append("video kept at noise")
        parts.append(f"actions {mode.action}" + (f" -> {tuple(r.actions.shape[1:])}" if r.actions is not None else ""))
        echo(f"  {name:5s} ({mode.description}): {'; '.join(parts)}  [{r.steps} Euler steps, "
             f"{time.perf_counter() - t0:.2f}s]")
        results[name] = r
    if out_dir is not None:
        model.save_pretrained(out_dir)
        echo(f"saved the model to {out_dir}/ (motus_config.json + safetensors); reload with MotusModel.from_pretrained")
    return {"steps": step, "first_loss": first, "last_loss": last, "results": results}
