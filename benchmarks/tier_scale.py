"""A tier of a million episodes: ingest, versioning, status/show, and the loader's open, first window, memory.

    python benchmarks/tier_scale.py [--episodes 1000000] [--frames 4] [--size 8] [--workers 2]

Synthesises `--episodes` short episodes (small frames, npz) from a `python` source in a project of its own
(params.yaml with one tier), then measures, each against what it is compared with:

1. ingest: `motus data ingest` episodes/s (validation, encoding, sharding, statistics) with one process and
   with `--workers N` (default 2) worker processes, their ratio, and that both wrote the same content hash;
2. versioning: `dvc add` + `dvc push` of the built tier to a local remote (what `motus data version` does
   after the ingest it reproduces) against `tar | md5sum` of the same bytes, with DVC's cache type as motus sets
   it by default (reflink,copy) and with hardlink (MOTUS_DVC_CACHE_TYPE); ratio target <= 1.5;
3. `motus data status` and `motus data show` seconds (targets: status <= 2 s), each against the CLI's own
   start-up (`motus --help`), which no command can beat;
4. the window loader over the whole tier, in a fresh process: open seconds (target <= 5 s), first window
   seconds, and the process's peak resident memory (target <= 2 GB).

The issue's targets are printed beside each number as a ratio (value / target; <= 1 meets it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOTUS = REPO / ".venv" / "bin" / "motus"

SOURCE = '''
import numpy as np
from motus.data.episode import Episode

def episodes(n, frames, size):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
    actions = rng.uniform(0.1, 0.9, (frames, 14)).astype(np.float32)
    for i in range(n):
        yield Episode(f"ep{i:07d}", {"top": np.roll(base, i % size, axis=2)}, actions + (i % 7) * 0.01, actions,
                      ["pick up the cube"], 10.0, "aloha", "scale")
'''

LOADER = '''
import json, resource, sys, time
t = time.perf_counter()
from motus.data.loader import TierWindows, WindowSpec
from motus.data.tier import Tier
imported = time.perf_counter() - t
t = time.perf_counter()
ds = TierWindows(Tier(sys.argv[1]), WindowSpec(chunk=2, video_action_ratio=2, downsample=1, image_size=(8, 8)),
                 split="train")
opened = time.perf_counter() - t
t = time.perf_counter()
ds[len(ds) // 2]
first = time.perf_counter() - t
print(json.dumps({"open_s": opened, "first_window_s": first, "windows": len(ds), "import_s": imported,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def timed(cmd: list[str] | str, cwd: Path, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, **kw)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=1_000_000)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="Worker processes of the second ingest.")
    ap.add_argument("--keep", action="store_true", help="Keep the project folder (printed).")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="motus-tier-scale-"))
    try:
        (root / "scale_source.py").write_text(textwrap.dedent(SOURCE))
        (root / "params.yaml").write_text(json.dumps({
            "data": {"root": "data/tiers", "codec": "npz"},
            "tiers": {"big": {"level": 4, "embodiment": "aloha", "action_dim": 14, "source": {
                "kind": "python", "options": {"file": str(root / "scale_source.py"), "function": "episodes",
                                              "n": args.episodes, "frames": args.frames, "size": args.size}}}}}))
        env = {**os.environ, "MOTUS_PARAMS": str(root / "params.yaml")}
        print(f"tier of {args.episodes:,} episodes x {args.frames} frames of {args.size}x{args.size} (npz), {root}")

        tier = root / "data" / "tiers" / "big"
        rates, hashes = {}, {}
        for workers in sorted({1, args.workers}):  # the second ingest replaces the first tier: it must be the same
            ingest_s = timed([str(MOTUS), "data", "ingest", "big", "--workers", str(workers)], root, env=env)
            rates[workers] = args.episodes / ingest_s
            hashes[workers] = json.loads((tier / "manifest.json").read_text())["content_hash"]
        size_mb = sum(p.stat().st_size for p in tier.rglob("*") if p.is_file()) / 2**20
        print(f"ingest: {rates[1]:,.0f} episodes/s with 1 worker, {rates[args.workers]:,.0f} with {args.workers} -> "
              f"ratio {rates[args.workers] / rates[1]:.2f} ({os.cpu_count()} CPUs; {size_mb:,.0f} MB written; content "
              f"hash {'identical' if len(set(hashes.values())) == 1 else 'DIFFERS: ' + str(hashes)})")

        tar_s = timed(f"tar cf - -C {tier.parent} {tier.name} | md5sum", root, shell=True)
        dvc = [sys.executable, "-m", "dvc"]
        subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
        (root / "remote").mkdir()
        subprocess.run([*dvc, "remote", "add", "-d", "local", str(root / "remote")], cwd=root, check=True,
                       capture_output=True)
        for cache_type in ("reflink,copy", "hardlink"):  # MOTUS_DVC_CACHE_TYPE: the default, and no copy at all
            shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)
            shutil.rmtree(root / "remote", ignore_errors=True)
            (root / "remote").mkdir()
            (root / "data" / "tiers" / "big.dvc").unlink(missing_ok=True)
            subprocess.run([*dvc, "config", "--local", "cache.type", cache_type], cwd=root, check=True)
            version_s = timed([*dvc, "add", "-q", "data/tiers/big"], root) + timed([*dvc, "push", "-q"], root)
            print(f"versioning (cache.type {cache_type}): dvc add + push {version_s:.1f}s vs tar|md5sum {tar_s:.1f}s "
                  f"-> ratio {version_s / tar_s:.2f} (target <= 1.5: {version_s / tar_s / 1.5:.2f} of it)")
            subprocess.run([*dvc, "unprotect", "data/tiers/big"], cwd=root, check=True, capture_output=True)

        startup = min(timed([str(MOTUS), "--help"], root, env=env) for _ in range(3))
        status = min(timed([str(MOTUS), "data", "status"], root, env=env) for _ in range(3))
        show = min(timed([str(MOTUS), "data", "show", "big"], root, env=env) for _ in range(3))
        print(f"data status: {status:.2f}s ({status / 2:.2f} of the 2 s target; CLI start-up alone {startup:.2f}s)")
        print(f"data show: {show:.2f}s ({show / startup:.2f}x the CLI start-up)")

        out = subprocess.run([sys.executable, "-c", LOADER, str(tier)], cwd=REPO, check=True, capture_output=True,
                             text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"loader: open {r['open_s']:.2f}s ({r['open_s'] / 5:.2f} of the 5 s target), first window "
              f"{r['first_window_s']:.2f}s, peak memory {r['max_rss_mb']:,.0f} MB ({r['max_rss_mb'] / 2048:.2f} of "
              f"the 2 GB target), {r['windows']:,} windows")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
