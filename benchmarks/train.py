"""Training-job overheads, printed as ratios.

    python benchmarks/train.py [--steps 12]

1. MLflow logging on vs off: median step time of the same tiny Stage 3 job (1 process) with the MLflow
   tracker vs no tracker. Goal: ratio ~1.0 (logging must not slow training).
2. Real loader vs in-memory batch: median step time reading windows from the tier (decode, resize, VAE,
   VLM) vs re-using one prepared batch. Shows how much of a tiny step is input pipeline.
3. Checkpoint save+load throughput (bytes/s) vs `dd` writing and reading the same number of bytes on the
   same disk (ratio of throughputs, median over saves each paired with a `dd` right after it; the save counted
   until it is committed, fsyncs included). Goal >= 0.7.
   And how long the training loop is blocked by an asynchronous save (snapshot to host memory) as a fraction of
   the save's write time. Goal <= 0.1. `--only checkpoint` runs just this part.
4. One vs two processes: samples/s of `motus train --nproc 2` over `--nproc 1` (this machine has 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MOTUS = Path(sys.executable).parent / "motus"


def make_project(root: Path, steps: int) -> Path:
    from motus.config import validate_params
    from motus.data.ingest import ingest_tier

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for s in raw["stages"].values():
        s.update(steps=steps, batch_size=4, checkpoint_every=10**6, validate_every=10**6,
                 warmup_steps=min(s.get("warmup_steps", 0), steps))  # the config refuses a warm-up past the end
    keep = raw["stages"]["stage3"]["tiers"]
    raw["tiers"] = {k: v for k, v in raw["tiers"].items() if k in keep}
    raw["stages"] = {"stage3": dict(raw["stages"]["stage3"], parent=None)}
    raw["gates"] = {k: v for k, v in raw.get("gates", {}).items() if k == raw["stages"]["stage3"]["registered_model"]}
    for t in raw["tiers"].values():
        t["source"]["options"]["n"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = validate_params(raw)
    for name, tier in params.tiers.items():
        ingest_tier(name, tier, root / "data" / "tiers" / name)
    return root


def env(root: Path) -> dict:
    e = dict(os.environ, MOTUS_TRACKING_URI=f"sqlite:///{root}/mlflow.db", MLFLOW_DISABLE_TELEMETRY="true",
             TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    e.pop("MOTUS_PARAMS_FILE", None)
    e.pop("MOTUS_PARAMS", None)
    return e


def job(root: Path, name: str, *extra: str) -> list[dict]:
    r = subprocess.run([str(MOTUS), "train", "--stage", "3", "--run-dir", f"runs/{name}", *extra], cwd=root,
                       env=env(root), capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"job {name} failed:\n{r.stderr[-2000:]}")
    return [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def median_step(records: list[dict]) -> float:
    return statistics.median(r["perf/step_time_s"] for r in records[2:])  # skip warm-up steps


def checkpoint_vs_dd(engine, ck: Path, saves: int = 5) -> tuple[float, float, int, float, float]:
    """(save+load bytes/s over dd's write+read bytes/s, loop-blocked / write time, checkpoint bytes, blocked ms,
    write ms) of an engine's
    checkpoint: asynchronous saves, each counted until committed (fsyncs included) plus a load; medians.

    Each save+load is paired with a `dd` of the same bytes right after it, and the ratio is the median of the
    pairs' ratios: a VM disk's write speed drifts several-fold within seconds (host write cache), so timing all
    saves first and all `dd`s afterwards compares two different disks."""
    from motus.train.checkpoint import CheckpointSaver, load_checkpoint

    saver = CheckpointSaver(background=True)
    meta = dict(stage="bench", config_hash="bench", parent=None, wall_seconds=0.0, data_position=0)
    path = saver.save(engine, ck, 0, **meta)  # warm-up: first-time costs (imports, allocations)
    saver.wait()
    nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    target = ck.parent / "dd.bin"
    mb = max(1, nbytes // 2**20)
    ratios, blocked, ms = [], [], []
    for i in range(1, saves + 1):
        t = time.perf_counter()
        saver.save(engine, ck, i, **meta)
        path = saver.wait()
        load_checkpoint(engine, path)
        ours = time.perf_counter() - t
        blocked.append(saver.timings[-1].blocked_s / saver.timings[-1].write_s)
        ms.append((saver.timings[-1].blocked_s * 1e3, saver.timings[-1].write_s * 1e3))
        t = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mb}", "conv=fsync"], check=True,
                       capture_output=True)
        subprocess.run(["dd", f"if={target}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
        dd = time.perf_counter() - t
        target.unlink()
        ratios.append((nbytes / ours) / (mb * 2**20 / dd))
    return (statistics.median(ratios), statistics.median(blocked), nbytes, statistics.median(m[0] for m in ms),
            statistics.median(m[1] for m in ms))


def large_engine(mparams: int):
    """A DeepSpeed engine (ZeRO-2, AdamW) over `mparams` million parameters: a checkpoint big enough that disk
    bandwidth, not per-save latency, decides its time (the tiny preset's is ~1.5 MB)."""
    import deepspeed
    import torch

    width = 2048
    layers = max(1, mparams * 10**6 // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9})
    loss = engine(torch.randn(1, width)).sum()
    engine.backward(loss)
    engine.step()  # the optimizer's moments exist
    return engine


def in_process_pipeline(root: Path, steps: int, large_mparams: int) -> dict[str, float]:
    """The loader's and the checkpoints' numbers, in this process (world of 1)."""
    os.chdir(root)
    os.environ.update(env(root))
    from motus.config import load_params
    from motus.train.distributed import init_distributed
    from motus.train.stage import StageJob
    from motus.train.trainer import Trainer

    ctx = init_distributed()
    j = StageJob(load_params("params.yaml"), "stage3", root / "runs" / "inproc", ctx)
    engine = Trainer(j).start()

    def step(inputs, s):
        out = engine.module.training_loss(**inputs, generator=j._noise(s))
        engine.backward(out["loss"])
        engine.step()

    real, mem = [], []
    fixed = j._inputs(j._batch(0))
    for s in range(steps):
        t = time.perf_counter()
        step(j._inputs(j._batch(s)), s)
        real.append(time.perf_counter() - t)
        t = time.perf_counter()
        step(fixed, s)
        mem.append(time.perf_counter() - t)
    out = dict(real=statistics.median(real[2:]), mem=statistics.median(mem[2:]))
    (out["tiny"], out["tiny_blocked"], out["tiny_bytes"], out["tiny_blocked_ms"],
     out["tiny_write_ms"]) = checkpoint_vs_dd(engine, root / "runs" / "inproc" / "ck")
    big = large_engine(large_mparams)
    (out["large"], out["large_blocked"], out["large_bytes"], out["large_blocked_ms"],
     out["large_write_ms"]) = checkpoint_vs_dd(big, root / "runs" / "large" / "ck")
    import torch.distributed as dist

    dist.destroy_process_group()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", choices=["checkpoint"], help="run only this part (loader and checkpoint lines)")
    ap.add_argument("--large-mparams", type=int, default=48,
                    help="parameters (millions) of the large checkpoint's model; ZeRO-2 + AdamW: 16 bytes each")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(Path(tmp), args.steps)
        if args.only is None:
            off = median_step(job(root, "off", "--no-track"))
            on = median_step(job(root, "on"))
            print(f"MLflow logging: step {on * 1e3:.0f} ms on vs {off * 1e3:.0f} ms off -> ratio {on / off:.2f}")
            one = job(root, "one", "--no-track", "--nproc", "1")
            two = job(root, "two", "--no-track", "--nproc", "2")
            sps1 = statistics.median(r["perf/samples_per_s"] for r in one[2:])
            sps2 = statistics.median(r["perf/samples_per_s"] for r in two[2:])
            print(f"processes: {sps2:.1f} samples/s with 2 vs {sps1:.1f} with 1 -> ratio {sps2 / sps1:.2f}")
        r = in_process_pipeline(root, args.steps, args.large_mparams)
        print(f"loader: step {r['real'] * 1e3:.0f} ms with the real loader vs {r['mem'] * 1e3:.0f} ms in-memory -> "
              f"ratio {r['real'] / r['mem']:.2f}")
        for key in ("tiny", "large"):
            print(f"checkpoint ({key}, {r[key + '_bytes'] / 2**20:.1f} MB): save+load vs dd throughput -> ratio "
                  f"{r[key]:.2f} (goal >= 0.7); training loop blocked per save / write time -> ratio "
                  f"{r[key + '_blocked']:.3f} (goal <= 0.1; {r[key + '_blocked_ms']:.1f} ms of "
                  f"{r[key + '_write_ms']:.1f} ms)")

if __name__ == "__main__":
    main()
