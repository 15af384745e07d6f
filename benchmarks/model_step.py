"""Train-step speed of the Motus network, as a ratio of what this machine's matmul can do.

    python benchmarks/model_step.py [--presets tiny small] [--steps 10] [--batch 2]

For each preset: one optimiser step (forward + backward + AdamW) is timed over --steps steps after warm-up;
its FLOPs are counted with torch's FlopCounterMode; achieved FLOP/s is printed as a fraction of a plain
square fp32 matmul's FLOP/s on the same device. Small models are overhead-bound, so a low ratio for `tiny`
is expected; the ratio should climb with size. Run on demand, not in CI.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from motus.model import MotusModel, build_config


def matmul_flops_per_s(device: str, n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_preset(preset: str, steps: int, batch: int, device: str) -> dict:
    torch.manual_seed(0)
    cfg = build_config(preset)
    model = MotusModel(cfg, with_vae=False).to(device).train()
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, *cfg.latent_shape, generator=g).to(device)
    text = torch.randn(batch, 16, cfg.video["text_dim"], generator=g).to(device)
    act = torch.randn(batch, cfg.action.chunk, cfg.action.action_dim, generator=g).to(device)
    state = torch.randn(batch, cfg.action.state_dim, generator=g).to(device)
    imgs = torch.rand(batch, 3, cfg.vlm_image_size, cfg.vlm_image_size, generator=g)
    und = model.encode_understanding(imgs, ["pick up the cube"] * batch).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model.training_loss(lat, text, act, state, und)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"preset": preset, "params": trainable, "step_s": statistics.median(times), "flops": flops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    peak = matmul_flops_per_s(args.device)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"plain 1024^2 fp32 matmul: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'preset':8s} {'trainable':>12s} {'step':>10s} {'GFLOP/step':>11s} {'GFLOP/s':>9s} {'vs matmul':>10s}")
    rows = [bench_preset(p, args.steps, args.batch, args.device) for p in args.presets]
    for r in rows:
        achieved = r["flops"] / r["step_s"]
        print(f"{r['preset']:8s} {r['params']:12,d} {r['step_s'] * 1e3:8.1f}ms {r['flops'] / 1e9:11.3f} "
              f"{achieved / 1e9:9.2f} {achieved / peak:10.3f}")
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            print(f"{r['preset']} / {base['preset']}: step time x{r['step_s'] / base['step_s']:.2f}, "
                  f"FLOPs x{r['flops'] / base['flops']:.1f}, efficiency x"
                  f"{(r['flops'] / r['step_s']) / (base['flops'] / base['step_s']):.2f}")


if __name__ == "__main__":
    main()
