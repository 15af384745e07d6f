"""One prepared call on a GPU node: does Motus train here, and how fast is the full model? Prints one JSON object.

    bash build/gpu-check/run.sh [--out FILE]       on the node (installs the bundle offline, then runs this)
    python benchmarks/gpu_check.py --dry           anywhere (what `make gpu-check` runs without CUDA)

(a) `stages`: a tiny Stage 1 job, then a tiny Stage 3 job starting from its export, through the real stage job
    (DeepSpeed, checkpoints, export; no MLflow) on synthetic npz tiers written here, with `precision: auto`
    (bf16 autocast on CUDA). Checks: every loss is finite, and it falls (mean of the last 3 steps below the
    first 3) when there are at least 10 steps.
(b) `full_stage3`: the `full` preset with random weights (never downloaded) trains Stage 3 steps (all three
    experts, fp32 master weights, bf16 autocast, activation checkpointing, AdamW) at batch 1, 2, 4, ... until
    out of memory or out of time: step time, peak memory, achieved TFLOP/s and MFU against the device's dense
    bf16 peak, from the analytic FLOP count in mot_flops.py, next to the memory estimate of
    `motus model memory`. The frozen parts are not run: the T5 context is pre-encoded (as the official code
    can) and the VLM's last hidden states are random features of the right length; their cost is reported
    apart (`vlm_forward_tflop_per_sample`).
Dry mode (no CUDA, or --dry): the same code on the CPU with bf16 autocast, 3 steps, the `small` preset in (b).
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mot_flops.py sits next to this file
import mot_flops  # noqa: E402

# Dense bf16 peak per device (vendor figures, TFLOP/s); the longest matching name wins.
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "L40S": 362.0}
INSTRUCTION = "transfer the cube from the right arm to the left arm"


# ------------------------------------------------------------------------------------- synthetic tiers
def synthetic_episodes(n: int, seed: int, frames: int = 40, size: int = 64, instruction: str = INSTRUCTION):
    """A bright square gliding over a dark floor; the 14-d action is its next position (so actions and video
    agree), the state its current one. Learnable in a few steps, which is all the smoke run needs."""
    from motus.data.episode import Episode

    rng = np.random.default_rng(seed)
    for i in range(n):
        start, velocity = rng.uniform(8, size - 16, 2), rng.uniform(-1.5, 1.5, 2)
        pos = np.clip(start + velocity * np.arange(frames + 1)[:, None], 0, size - 9)
        video = np.full((frames, size, size, 3), 30, np.uint8)
        for t in range(frames):
            y, x = pos[t].astype(int)
            video[t, y:y + 8, x:x + 8] = (230, 180, 60)
        state = np.zeros((frames, 14), np.float32)
        state[:, :2] = pos[:-1] / size
        actions = np.zeros((frames, 14), np.float32)
        actions[:, :2] = pos[1:] / size
        yield Episode(f"sq{seed}_{i:03d}", {"top": video}, actions, state, [instruction], fps=30.0,
                      embodiment="square", source="gpu-check")


def project_params(root: Path, steps: int) -> dict:
    """A params.yaml for the smoke run: tiny preset, two synthetic npz tiers, Stage 1 and Stage 3 only."""
    here = str(Path(__file__).resolve())

    def tier(level: int, seed: int) -> dict:
        return {"level": level, "embodiment": "square", "action_dim": 14, "source": {"kind": "python", "options": {
            "function": "synthetic_episodes", "file": here, "n": 6, "seed": seed, "codec": "npz"}}}

    common = dict(steps=steps, batch_size=4, lr=2e-3, warmup_steps=1, checkpoint_every=steps,
                  validate_every=steps, zero_stage=2, activation_checkpointing=True)
    return {
        "project": {"name": "gpu-check", "seed": 0},
        "precision": "auto",
        "data": {"root": str(root / "data" / "tiers"), "heldout_fraction": 0.2},
        "tiers": {"square-video": tier(3, 1), "square-target": tier(6, 2)},
        "stages": {
            "stage1": dict(common, stage=1, tiers={"square-video": 1.0}, trains=["video"], action_source="none",
                           registered_model="gpu-check-vgm"),
            "stage3": dict(common, stage=3, tiers={"square-target": 1.0}, trains=["video", "action", "understanding"],
                           action_source="real", registered_model="gpu-check-aloha"),
        },
    }


def smoke_stages(steps: int, precision: str | None) -> dict:
    """(a): Stage 1 then Stage 3, each a real job through the `local` launcher (torchrun + the worker, one
    process), exactly as `motus train --no-track` runs it."""
    import yaml

    from motus.config import validate_params
    from motus.contracts import JobSpec, LineageRecord
    from motus.data.ingest import ingest_tier
    from motus.launch.local import run_local

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="motus-gpu-check-") as tmp:
        root = Path(tmp)
        raw = project_params(root, steps)
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        params = validate_params(raw)
        for name, tier in params.tiers.items():
            ingest_tier(name, tier, root / "data" / "tiers" / name)
        parent = None
        for stage in ("stage1", "stage3"):
            run_dir = root / "runs" / stage
            t0 = time.perf_counter()
            spec = JobSpec(stage=stage, run_dir=run_dir, params_file=root / "params.yaml", init_from=parent,
                           track=False, precision=precision)
            code = run_local(spec, log=root / f"{stage}.log")
            losses = [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                      if "train/loss" in line] if (run_dir / "metrics.jsonl").exists() else []
            finite = bool(losses) and all(math.isfinite(v) for v in losses)
            falls = len(losses) < 10 or float(np.mean(losses[-3:])) < float(np.mean(losses[:3]))
            export = run_dir / "export"
            lineage = LineageRecord.read(export) if LineageRecord.exists(export) else None
            out[stage] = {"exit": code, "steps": len(losses), "precision": lineage and lineage.precision,
                          "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                          "finite": finite, "falls": falls, "checked_falls": len(losses) >= 10,
                          "seconds": round(time.perf_counter() - t0, 2),
                          "ok": code == 0 and finite and falls and bool(lineage)}
            if code != 0:
                out[stage]["log_tail"] = (root / f"{stage}.log").read_text()[-2000:]
                break
            parent = str(export)
    return out


# -------------------------------------------------------------------------------------- full-size timing
def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu (no vendor peak: MFU not computed)"
    name = torch.cuda.get_device_name(device)
    match = max((k for k in PEAK_BF16_TFLOPS if k in name), key=len, default=None)
    return (PEAK_BF16_TFLOPS[match], name) if match else (None, name)


def synthetic_inputs(cfg, batch: int, device: torch.device, understanding_tokens: int) -> dict:
    from motus.model.vlm import UnderstandingContext

    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    return {"video_latents": rand(batch, *cfg.latent_shape),
            "text_embeds": rand(batch, cfg.text_len, cfg.video["text_dim"]),
            "actions": rand(batch, cfg.action.chunk, cfg.action.action_dim),
            "state": rand(batch, cfg.action.state_dim),
            "understanding": UnderstandingContext(rand(batch, understanding_tokens, cfg.understanding.vlm_hidden),
                                                  torch.ones(batch, understanding_tokens, dtype=torch.bool,
                                                             device=device))}


def time_stage3(preset: str, batches: list[int], steps: int, device: torch.device, deadline: float) -> dict:
    """(b): Stage 3 training steps of `preset` at each batch size until OOM or the deadline."""
    from motus.model import MotusModel, build_config
    from motus.train.memory import estimate_training_memory
    from motus.train.precision import autocast

    cfg = build_config(preset)
    cfg.action.encoder_mode = "finetune"
    peak, device_name = peak_tflops(device)
    u_tokens = mot_flops.understanding_tokens(cfg)
    report: dict = {"preset": preset, "device": device_name, "peak_bf16_tflops": peak, "steps_timed": steps - 1,
                    "tokens": {"video": mot_flops.video_tokens(cfg), "action": mot_flops.action_tokens(cfg, "finetune"),
                               "understanding": u_tokens, "text": cfg.text_len},
                    "vlm_forward_tflop_per_sample": mot_flops.vlm_forward_flops(cfg, 1)["total"] / 1e12,
                    "batches": []}
    torch.manual_seed(0)
    with torch.device(device), warnings_quiet():
        model = MotusModel(cfg, with_vlm=False, with_vae=False)
    model.set_trainable(["video", "action", "understanding"])
    model.gradient_checkpointing = True
    report["parameters"] = model.parameter_counts()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=device.type == "cuda")
    for batch in batches:
        if time.monotonic() > deadline:
            report["batches"].append({"batch": batch, "skipped": "time budget spent"})
            break
        row: dict = {"batch": batch}
        try:
            inputs = synthetic_inputs(cfg, batch, device, u_tokens)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for i in range(steps):
                sync(device)
                t0 = time.perf_counter()
                with autocast("bf16", device):
                    loss = model.training_loss(**inputs, generator=torch.Generator(device=device).manual_seed(i))["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.5)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                times.append(time.perf_counter() - t0)
            step_s = float(np.median(times[1:] or times))  # the first step pays for allocation and kernels
            flops = mot_flops.exact_training_step_flops(cfg, batch, 3, activation_checkpointing=True)["total"]
            est = estimate_training_memory(cfg, stage=3, batch_size=batch, zero_stage=0, offload=False,
                                           activation_checkpointing=True, precision="bf16")
            # this timing loads neither the VLM nor the VAE (their outputs are synthetic): compare like with like
            est_bytes = est.total_bytes - sum(est.frozen_weights.get(k, 0) for k in ("vlm", "vae"))
            row.update(step_s=round(step_s, 4), loss=float(loss.detach()), finite=bool(torch.isfinite(loss).item()),
                       tflops=round(flops / step_s / 1e12, 6), tflop_per_step=round(flops / 1e12, 6),
                       estimated_peak_gib=round(est_bytes / 2**30, 2))
            if device.type == "cuda":
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if peak:
                row["mfu"] = round(flops / step_s / (peak * 1e12), 4)
        except torch.OutOfMemoryError:
            row["oom"] = True
        finally:
            inputs = loss = None
            opt.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["batches"].append(row)
        if row.get("oom"):
            break
    return report


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="full preset without local weights")
        yield


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU dry mode even where CUDA is present.")
    ap.add_argument("--steps", type=int, default=None, help="Smoke-run steps per stage (default: 20; dry: 3).")
    ap.add_argument("--batches", default="1,2,4,8", help="Batch sizes to time in (b), ascending (dry: 1,2).")
    ap.add_argument("--budget-s", type=float, default=480.0, help="Stop timing new batch sizes after this.")
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON object here.")
    args = ap.parse_args(argv)
    started = time.monotonic()
    os.environ.setdefault("DS_BUILD_OPS", "0")
    dry = args.dry or not torch.cuda.is_available()
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    if dry:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    report: dict = {"mode": "dry" if dry else "gpu", "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if not dry else "cpu"}
    for name in ("transformers", "diffusers", "deepspeed", "pydantic"):
        with contextlib.suppress(Exception):
            report[name] = __import__(name).__version__
    steps = args.steps or (3 if dry else 20)
    # dry mode asks for bf16 explicitly (auto is fp32 on a CPU) so the autocast path is the one proven
    report["stages"] = smoke_stages(steps, "bf16" if dry else None)
    batches = [1, 2] if dry and args.batches == ap.get_default("batches") else [int(b) for b in args.batches.split(",")]
    report["full_stage3"] = time_stage3("small" if dry else "full", batches, 3, device,
                                        started + args.budget_s)
    ok = all(s["ok"] for s in report["stages"].values()) and any(
        b.get("finite") for b in report["full_stage3"]["batches"])
    report.update(ok=ok, seconds=round(time.monotonic() - started, 1))
    text = json.dumps(report, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
