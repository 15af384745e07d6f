"""Data-room speed, printed as ratios against plain baselines.

    python benchmarks/data.py [--episodes 64] [--frames 60] [--size 64]

1. ingest: episodes/s through validation + encoding + sharding (mp4 and npz codecs), synthetic episodes
   (simulator rendering speed is reported by the simulator tests, not here).
2. versioning: `dvc add` of the tier folder (hashing + cache copy) against `tar` + `md5sum` of the same
   bytes; ratio = dvc / tar+md5 (lower is better; ~1-3 is healthy).
3. loader: windows/s of the window loader against tiny-model train steps/s; ratio > 1 means the loader
   keeps up with training on one core.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from motus.data.episode import Episode
from motus.data.loader import TierWindows, WindowSpec
from motus.data.tier import Tier, TierSpec, TierWriter


def synthetic(n: int, t: int, size: int) -> list[Episode]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        x = np.linspace(0, 1, size)
        base = (np.sin(6 * x[None, :, None] + 6 * x[:, None, None] + np.arange(t)[:, None, None, None] * 0.1) + 1) * 120
        frames = np.repeat(base, 3, axis=-1).astype(np.uint8)
        out.append(Episode(f"ep{i:05d}", {"top": frames}, rng.normal(size=(t, 14)).astype(np.float32),
                           rng.normal(size=(t, 14)).astype(np.float32), ["pick up the cube"], 50.0, "aloha", "bench"))
    return out


def bench_ingest(eps: list[Episode], root: Path, codec: str) -> tuple[float, Path]:
    t = time.perf_counter()
    w = TierWriter(root / f"tier-{codec}", TierSpec(f"tier-{codec}", 6, "aloha", 14, codec=codec))
    for e in eps:
        assert not e.problems(action_dim=14)
        w.add(e)
    w.close()
    return len(eps) / (time.perf_counter() - t), root / f"tier-{codec}"


def bench_versioning(tier_dir: Path, root: Path) -> tuple[float, float]:
    t = time.perf_counter()
    subprocess.run(f"tar cf - -C {tier_dir.parent} {tier_dir.name} | md5sum", shell=True, check=True,
                   capture_output=True)
    tar_s = time.perf_counter() - t
    repo = root / "repo"
    repo.mkdir()
    shutil.copytree(tier_dir, repo / "tier")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    t = time.perf_counter()
    subprocess.run([*dvc, "add", "-q", "tier"], cwd=repo, check=True)
    return time.perf_counter() - t, tar_s


def big_tier(root: Path, mb: float) -> Path:
    """Incompressible frames (npz) so the tier's size is what the benchmark says."""
    rng = np.random.default_rng(0)
    per_ep = 60 * 96 * 96 * 3
    n = max(1, int(mb * 2**20 / per_ep))
    w = TierWriter(root / "big", TierSpec("big", 6, "aloha", 14, codec="npz"))
    for i in range(n):
        w.add(Episode(f"ep{i:05d}", {"top": rng.integers(0, 255, (60, 96, 96, 3), dtype=np.uint8)},
                      rng.normal(size=(60, 14)).astype(np.float32), None, ["x"], 50.0, "aloha", "bench"))
    w.close()
    return root / "big"


def dvc_startup(root: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "version"], cwd=root, check=True, capture_output=True)
    return time.perf_counter() - t


def bench_loader(tier_dir: Path, n: int) -> float:
    tier = Tier(tier_dir)
    ds = TierWindows(tier, WindowSpec(chunk=8, video_action_ratio=2, downsample=3, image_size=(64, 64)), split="all")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(ds), n)
    t = time.perf_counter()
    for i in idx:
        ds[int(i)]
    return n / (time.perf_counter() - t)


def bench_train_step() -> float:
    from motus.model import MotusModel, build_config

    torch.manual_seed(0)
    m = MotusModel(build_config("tiny"), with_vlm=False, with_vae=False)
    cfg = m.config
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    b = dict(video_latents=torch.randn(4, *cfg.latent_shape), text_embeds=torch.randn(4, 8, cfg.video["text_dim"]),
             actions=torch.randn(4, cfg.action.chunk, 14), state=torch.randn(4, 14))
    for _ in range(3):
        m.training_loss(**b)["loss"].backward()
    t, n = time.perf_counter(), 20
    for _ in range(n):
        loss = m.training_loss(**b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return n * 4 / (time.perf_counter() - t)  # windows per second (batch 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=128)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--version-mb", type=float, default=200, help="Size of the tier the versioning benchmark hashes.")
    args = ap.parse_args()
    eps = synthetic(args.episodes, args.frames, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for codec in ("npz", "mp4"):
            rate, tier_dir = bench_ingest(eps, root, codec)
            mb = sum(p.stat().st_size for p in tier_dir.rglob("*") if p.is_file()) / 2**20
            print(f"ingest [{codec}]: {rate:.1f} episodes/s ({rate * args.frames:.0f} frames/s), tier {mb:.1f} MB")
        big = big_tier(root, args.version_mb)
        mb = sum(p.stat().st_size for p in big.rglob("*") if p.is_file()) / 2**20
        dvc_s, tar_s = bench_versioning(big, root)
        start = dvc_startup(root)
        print(f"versioning ({mb:.0f} MB tier): dvc add {dvc_s:.2f}s vs tar+md5sum {tar_s:.2f}s -> ratio "
              f"{dvc_s / tar_s:.1f} ({(dvc_s - start) / tar_s:.1f} without dvc's {start:.2f}s start-up)")
        win = bench_loader(tier_dir, 200)
        steps = bench_train_step()
        print(f"loader: {win:.0f} windows/s (mp4, 64x64) vs tiny train step {steps:.0f} windows/s "
              f"-> ratio {win / steps:.2f} (>1: the loader keeps up on one core)")


if __name__ == "__main__":
    main()
