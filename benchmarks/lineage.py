"""Lineage speed in a busy store: `show` of a Stage 3 version and `uses` of a tier among 1,000 runs/versions.

The store is an MLflow server on PostgreSQL (the production profile), started here on 127.0.0.1 with a fresh
database on the local PostgreSQL and dropped afterwards. It is filled with 250 chains of four versions, shaped
like real registrations (motus-vgm -> motus-latent-action (+ motus-lam) -> motus-aloha), each version on its
own run with the `motus.*` tags registration writes; one tier hash is shared by every 10th chain.

    python benchmarks/lineage.py [--chains 250] [--repeat 20]

Prints rates and ratios only (ms per hop, versions/s), never bare totals.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from motus.track import lineage  # noqa: E402
from motus.track.registry import Registry  # noqa: E402
from tests.support.servers import fresh_postgres_database, mlflow_server  # noqa: E402

SHARED = hashlib.sha256(b"shared tier").hexdigest()
MODELS = ("motus-vgm", "motus-lam", "motus-latent-action", "motus-aloha")


def h(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def fill(client: MlflowClient, chains: int, workers: int = 8) -> float:
    """Create `chains` x 4 runs and versions; returns versions per second."""
    exp = client.create_experiment("lineage-bench")
    for m in MODELS:
        client.create_registered_model(m)

    def one_version(model: str, i: int, tier_digest: str, parents: dict[str, str]) -> str:
        run = client.create_run(exp, tags={"tier.target-aloha-transfer.digest": tier_digest, "stage": model})
        client.log_metric(run.info.run_id, "cost/device_hours", 0.5)
        tags = {"motus.stage": model, "motus.export_hash": h(model, i), "motus.checkpoint_hash": h("ckpt", model, i),
                "motus.config_hash": h("cfg", i), "motus.code_commit": h("git", i)[:40],
                "motus.tier.target-aloha-transfer.level": "6", "motus.tier.target-aloha-transfer.digest": tier_digest,
                "motus.tier.target-aloha-transfer.content_hash": tier_digest,
                "motus.device_hours": "0.5", "motus.cost": "1.75", "motus.currency": "USD", **parents}
        mv = client.create_model_version(model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                         tags=tags, await_creation_for=0)
        return f"{model}/{mv.version}"

    def chain(i: int) -> str:
        digest = SHARED if i % 10 == 0 else h("tier", i)
        vgm = one_version("motus-vgm", i, digest, {})
        lam = one_version("motus-lam", i, digest, {})
        s2 = one_version("motus-latent-action", i, digest, {"motus.parent_version": vgm, "motus.lam_version": lam})
        return one_version("motus-aloha", i, digest, {"motus.parent_version": s2})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(chain, range(chains)))
    return chains * 4 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, default=250, help="chains of 4 versions (250 -> 1,000 runs/versions)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, fresh_postgres_database("motus_bench") as db, \
            mlflow_server(db, Path(tmp) / "artifacts") as url:
        client = MlflowClient(url)
        rate = fill(client, args.chains)
        reg = Registry(url, params=None)
        target = f"models:/motus-aloha/{args.chains // 2}"
        show_s, hops = [], 0
        for _ in range(args.repeat):
            t = time.perf_counter()
            g = lineage.show(reg, target)
            show_s.append(time.perf_counter() - t)
            hops = g["hops"]
        uses_s, found = [], 0
        for _ in range(max(1, args.repeat // 4)):
            t = time.perf_counter()
            u = lineage.uses(reg, "target-aloha-transfer", SHARED[:12])
            uses_s.append(time.perf_counter() - t)
            found = len(u["versions"])
        single = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            client.get_model_version("motus-aloha", "1")
            single.append(time.perf_counter() - t)
        versions = args.chains * 4
        show_med, uses_med, one = statistics.median(show_s), statistics.median(uses_s), statistics.median(single)
        print(f"store: MLflow server on PostgreSQL, {versions} runs / {versions} versions")
        print(f"fill:          {rate:8.1f} versions/s (run + metric + tagged version, 8 threads)")
        print(f"lineage show:  {show_med / max(hops, 1) * 1e3:8.2f} ms per hop ({hops} hops, "
              f"{len(g['versions'])} versions); {show_med / one:6.1f}x one get_model_version round trip")
        print(f"lineage uses:  {found / uses_med:8.1f} downstream versions/s ({found} found); "
              f"{versions / uses_med:8.1f} store versions scanned/s")


if __name__ == "__main__":
    main()
