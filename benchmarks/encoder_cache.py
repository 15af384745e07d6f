"""The encoder cache, measured: what it saves per training step, printed as ratios.

    python benchmarks/encoder_cache.py [--steps 12]

1. Tiny preset, this machine: median Stage 3 step time reading windows through the encoder cache vs re-using
   one prepared in-memory batch, in the same process and engine, steps interleaved. Goal <= 1.05. The live
   loader (decode, resize, VAE, VLM in the loop) is printed beside it.
2. Full preset, counted: the frozen encoders' FLOPs per sample that the cache takes out of every step (the Wan
   2.2 VAE encoder counted by torch's FlopCounterMode on the meta device at the geometry's window, the
   Qwen3-VL-2B forward from benchmarks/mot_flops.py, umT5-XXL's encoder analytically at text_len tokens), as a
   ratio to the MoT training step's own FLOPs per sample.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# umT5-XXL (Wan 2.2's text encoder): d_model 4096, 24 encoder layers, gated FFN of 10240, 64 heads x 64
UMT5_XXL = {"d_model": 4096, "layers": 24, "d_ff": 10240, "heads": 64, "d_kv": 64}


def umt5_encoder_flops(tokens: int, c: dict = UMT5_XXL) -> int:
    inner = c["heads"] * c["d_kv"]
    per_layer = (2 * tokens * c["d_model"] * inner * 4  # q, k, v, o projections
                 + 2 * 2 * tokens * tokens * inner  # scores and values
                 + 2 * tokens * c["d_model"] * c["d_ff"] * 3)  # gated FFN: wi_0, wi_1, wo
    return c["layers"] * per_layer


def vae_encode_flops(cfg) -> int:
    import torch
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKLWan(**cfg.vae)
        x = torch.zeros(1, 3, cfg.num_frames, cfg.height, cfg.width)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        vae.encode(x)
    return int(fc.get_total_flops())


def full_preset_savings() -> dict[str, float]:
    import mot_flops

    from motus.model import build_config

    cfg = build_config("full")
    saved = {"vae": vae_encode_flops(cfg), "vlm": mot_flops.vlm_forward_flops(cfg, 1)["total"],
             "text": umt5_encoder_flops(cfg.text_len)}
    step = mot_flops.training_step_flops(cfg, 1, 3, True)["total"]
    return {**{k: v / 1e12 for k, v in saved.items()}, "total": sum(saved.values()) / 1e12, "step": step / 1e12}


def tiny_step_times(steps: int) -> dict[str, float]:
    import os

    import train as tb

    with tempfile.TemporaryDirectory() as tmp:
        root = tb.make_project(Path(tmp), steps)
        os.chdir(root)
        os.environ.update(tb.env(root))
        from motus.config import load_params
        from motus.train.distributed import init_distributed
        from motus.train.encode import encode_tier
        from motus.train.stage import StageJob
        from motus.train.trainer import Trainer

        params = load_params("params.yaml")
        ctx = init_distributed()
        job = StageJob(params, "stage3", root / "runs" / "inproc", ctx)
        engine = Trainer(job).start()
        assert not job.encoded_from, "the benchmark's project starts without caches"

        def step(inputs, s):
            out = engine.module.training_loss(**inputs, generator=job._noise(s))
            engine.backward(out["loss"])
            engine.step()

        def timed(make, s) -> float:
            t = time.perf_counter()
            step(make(s), s)
            return time.perf_counter() - t

        fixed = job._inputs(job._batch(0))
        live = [timed(lambda s: job._inputs(job._batch(s)), s) for s in range(steps)]
        started = time.perf_counter()
        for t in job.tiers:
            encode_tier(params, t)
        encode_s = time.perf_counter() - started
        job._build_data()  # the same job, now finding the caches
        assert set(job.encoded_from) == set(job.tiers)
        cached, mem = [], []
        for s in range(steps):
            cached.append(timed(lambda s: job._inputs(job._batch(s)), s))
            mem.append(timed(lambda s: fixed, s))
        import torch.distributed as dist

        dist.destroy_process_group()
        return {"live": statistics.median(live[2:]), "cached": statistics.median(cached[2:]),
                "mem": statistics.median(mem[2:]), "encode_s": encode_s,
                "windows": sum(len(ds) for ds in job.train_sets.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    f = full_preset_savings()
    print(f"full preset, per sample: the cache saves VAE encode {f['vae']:.2f} + VLM {f['vlm']:.3f} + umT5 "
          f"{f['text']:.2f} = {f['total']:.2f} TFLOP; the MoT training step (checkpointed) is {f['step']:.2f} TFLOP "
          f"-> ratio {f['total'] / f['step']:.2f}")
    r = tiny_step_times(args.steps)
    print(f"tiny preset: encoding the Stage 3 tiers took {r['encode_s']:.1f} s, once ({r['windows']} training windows)")
    print(f"loader with the encoder cache: step {r['cached'] * 1e3:.0f} ms vs {r['mem'] * 1e3:.0f} ms in-memory -> "
          f"ratio {r['cached'] / r['mem']:.2f} (goal <= 1.05); live loader {r['live'] * 1e3:.0f} ms -> ratio "
          f"{r['live'] / r['mem']:.2f}")


if __name__ == "__main__":
    main()
