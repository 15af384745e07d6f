"""Serving latency and throughput (tiny preset, this CPU), printed as ratios to the raw in-process `sample()`.

    python benchmarks/serve.py [--requests 60] [--export runs/stage3/export]

Without --export it trains a 2-step Stage 3 model on 3 episodes per tier (the numbers are about the serving
path, not the policy). Then, one observation at a time, with the same seeds:

1. raw: `model.sample("vla", ...)` on inputs already prepared on the device (what a policy cannot go below);
2. in process: `ExportedModel.plan` (the image resized and VAE-encoded, text and state prepared, sampled,
   un-normalised): the closed-loop evaluator's cost per plan;
3. `motus serve` on 127.0.0.1 (a separate process, one compute thread like the others): HTTP `/act` with a
   kept-alive connection and the websocket `/stream`, one request in flight; p50 and p99 per action chunk and
   requests/s;
4. four clients at once, `--max-batch 1` and `--max-batch 4`: requests/s.
Ratios: each path's p50 / p99 over the raw call's, requests/s over the raw call's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
MOTUS = REPO / ".venv" / "bin" / "motus"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def trained_export(root: Path) -> Path:
    import train as tb

    tb.make_project(root, 2)
    tb.job(root, "s3")
    return root / "runs" / "s3" / "export"


def start_server(export: Path, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    from motus.launch.local import free_port

    port = free_port()
    proc = subprocess.Popen([str(MOTUS), "serve", str(export), "--port", str(port), "--log-level", "warning",
                             "--max-batch", str(max_batch), "--batch-wait-ms", "2" if max_batch > 1 else "0"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            sys.exit(f"motus serve exited:\n{log.read_text()[-2000:]}")
    sys.exit("motus serve did not become healthy in 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--export", type=Path, default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from motus.evaluate.export import load_export
    from motus.evaluate.remote import PolicyClient, encode_image

    with tempfile.TemporaryDirectory() as tmp:
        export = a.export or trained_export(Path(tmp))
        ex = load_export(export)
        space = ex.serving.spaces[0]
        rng = np.random.default_rng(0)
        frame = rng.integers(0, 255, (*space.image_size, 3), dtype=np.uint8)
        state = np.asarray(ex.normalization(space.tier)["state"]["mean"], dtype=np.float32)
        n = a.requests

        # 1. raw sample() on prepared inputs
        from motus.data.loader import frames_to_video

        cfg = ex.cfg
        batch = {"video": frames_to_video(frame[None], (cfg.height, cfg.width))[None], "actions": None,
                 "state": torch.from_numpy(state[None]), "instruction": [space.instruction]}
        inputs = ex.inputs(batch)
        obs = inputs["video_latents"][:, :, :1]
        latents = torch.cat([obs, obs.new_zeros(*obs.shape[:2], cfg.latent_shape[1] - 1, *obs.shape[3:])], dim=2)
        raw = []
        for i in range(n + 3):
            t = time.perf_counter()
            with torch.no_grad():
                ex.model.sample("vla", latents, inputs["text_embeds"], state=inputs.get("state"),
                                understanding=inputs.get("understanding"), generator=torch.Generator().manual_seed(i))
            raw.append(time.perf_counter() - t)
        raw = raw[3:]
        # 2. the in-process plan
        plan = []
        for i in range(n + 3):
            t = time.perf_counter()
            ex.plan(frame, state, space.instruction, space.tier, generator=torch.Generator().manual_seed(i))
            plan.append(time.perf_counter() - t)
        plan = plan[3:]

        body = {"image": encode_image(frame), "state": state.tolist(), "instruction": space.instruction,
                "tier": space.tier}
        rows = [("raw sample()", raw, None), ("ExportedModel.plan", plan, None)]
        log = Path(tmp) / "serve.log"
        proc, url = start_server(export, 1, log)
        try:
            client = PolicyClient(url)
            http = []
            for i in range(n + 3):
                t = time.perf_counter()
                client.act({**body, "seed": i})
                http.append(time.perf_counter() - t)
            http = http[3:]
            from websockets.sync.client import connect

            ws_times = []
            with connect(url.replace("http://", "ws://") + "/stream") as ws:
                for i in range(n + 3):
                    t = time.perf_counter()
                    ws.send(json.dumps({**body, "seed": i}))
                    answer = json.loads(ws.recv())
                    ws_times.append(time.perf_counter() - t)
                    assert answer["status"] == 200, answer
            rows += [("motus serve, HTTP /act", http, None), ("motus serve, websocket", ws_times[3:], None)]
        finally:
            proc.terminate()
            proc.wait(30)

        raw_p50, raw_p99 = pct(raw, 50), pct(raw, 99)
        print(f"serving latency per action chunk ({cfg.action.chunk} actions), {n} requests, one in flight:")
        for name, xs, _ in rows:
            print(f"  {name:26s} p50 {1000 * pct(xs, 50):7.1f} ms (ratio {pct(xs, 50) / raw_p50:5.2f})  "
                  f"p99 {1000 * pct(xs, 99):7.1f} ms (ratio {pct(xs, 99) / raw_p99:5.2f})  "
                  f"{1 / statistics.mean(xs):6.1f} req/s (ratio {statistics.mean(raw) / statistics.mean(xs):4.2f})")

        for max_batch in (1, 4):
            proc, url = start_server(export, max_batch, log)
            try:
                done: list[float] = []

                def client_loop(k: int, url: str = url, done: list[float] = done) -> None:
                    c = PolicyClient(url)
                    for i in range(n // 4):
                        c.act({**body, "seed": k * 1000 + i})
                        done.append(time.perf_counter())

                t = time.perf_counter()
                threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                rate = len(done) / (time.perf_counter() - t)
                print(f"  4 clients, --max-batch {max_batch}: {rate:6.1f} req/s (ratio to raw "
                      f"{rate * statistics.mean(raw):4.2f})")
            finally:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
