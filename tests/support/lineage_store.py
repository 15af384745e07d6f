"""A busy registry without training: chains of versions shaped like real registrations, for lineage at scale.

Each chain is motus-vgm -> motus-latent-action (+ motus-lam) -> motus-aloha, every version on its own run with
the `motus.*` tags registration writes (stage, hashes, tier, cost, parent links); the run carries the tier tag
the tracker sets. One tier hash (`SHARED`) is shared by every 10th chain, so `uses` of it finds a tenth of the
store. Used by benchmarks/lineage.py (an MLflow server on PostgreSQL) and by tests (a SQLite store).
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from motus.track.tags import lineage_tier_tags

SHARED = hashlib.sha256(b"shared tier").hexdigest()
TIER = "target-aloha-transfer"
MODELS = ("motus-vgm", "motus-lam", "motus-latent-action", "motus-aloha")


def h(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def fill(client: Any, chains: int, *, start: int = 0, workers: int = 8, metrics: bool = True,
         experiment: str = "lineage-bench") -> float:
    """Add chains `start` .. `start + chains - 1` (4 runs and versions each); returns versions per second.

    The first call creates the experiment and the models. `workers` > 1 only on a server (SQLite serialises
    writers and would answer 'database is locked'); `metrics=False` leaves out the run's cost metric, which
    lineage never reads, to keep a test's fill short."""
    found = client.get_experiment_by_name(experiment)
    exp = found.experiment_id if found else client.create_experiment(experiment)
    if not found:
        for m in MODELS:
            client.create_registered_model(m)

    written: dict[str, dict[str, str]] = {}  # version -> its tags, for its children's lineage tags

    def one_version(model: str, i: int, tier_digest: str, parents: dict[str, str]) -> str:
        run = client.create_run(exp, tags={f"tier.{TIER}.digest": tier_digest, "stage": model})
        if metrics:
            client.log_metric(run.info.run_id, "cost/device_hours", 0.5)
        tags = {"motus.stage": model, "motus.export_hash": h(model, i), "motus.checkpoint_hash": h("ckpt", model, i),
                "motus.config_hash": h("cfg", i), "motus.code_commit": h("git", i)[:40],
                f"motus.tier.{TIER}.level": "6", f"motus.tier.{TIER}.digest": tier_digest,
                f"motus.tier.{TIER}.content_hash": tier_digest,
                "motus.device_hours": "0.5", "motus.cost": "1.75", "motus.currency": "USD", **parents}
        tags.update(lineage_tier_tags(tags, [written[v] for v in parents.values()]))  # as registration writes them
        mv = client.create_model_version(model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                         tags=tags, await_creation_for=0)
        written[f"{model}/{mv.version}"] = tags
        return f"{model}/{mv.version}"

    def chain(i: int) -> str:
        digest = SHARED if i % 10 == 0 else h("tier", i)
        vgm = one_version("motus-vgm", i, digest, {})
        lam = one_version("motus-lam", i, digest, {})
        s2 = one_version("motus-latent-action", i, digest, {"motus.parent_version": vgm, "motus.lam_version": lam})
        return one_version("motus-aloha", i, digest, {"motus.parent_version": s2})

    t0 = time.perf_counter()
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(chain, range(start, start + chains)))
    else:
        for i in range(start, start + chains):
            chain(i)
    return chains * 4 / (time.perf_counter() - t0)
