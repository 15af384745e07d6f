"""Lineage speed in a busy store: `show` of a Stage 3 version and `uses` of a tier among 1,000 runs/versions.

The store is an MLflow server on PostgreSQL (the production profile), started here on 127.0.0.1 with a fresh
database on the local PostgreSQL and dropped afterwards. It is filled with 250 chains of four versions, shaped
like real registrations (motus-vgm -> motus-latent-action (+ motus-lam) -> motus-aloha), each version on its
own run with the `motus.*` tags registration writes; one tier hash is shared by every 10th chain.

    python benchmarks/lineage.py [--chains 250] [--repeat 20]

Prints rates and ratios only (ms per hop, versions/s, MLflow calls per answer, the median answer time as a ratio
of the 1 s target), never bare totals. The filler is tests/support/lineage_store.py, shared with the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from motus.track import lineage  # noqa: E402
from motus.track.registry import Registry  # noqa: E402
from tests.support.lineage_store import SHARED, TIER, fill  # noqa: E402
from tests.support.servers import fresh_postgres_database, mlflow_server  # noqa: E402

TARGET_S = 1.0  # issue 19, item 3: `show` and `uses` each answer within a second in a 1,000-version store
CALLS = ("search_model_versions", "search_runs", "search_experiments", "get_model_version", "get_registered_model")


def count_calls(client: MlflowClient) -> dict[str, int]:
    """Count the client's reads from now on (instance attributes shadow the methods); returns the live counter."""
    seen = dict.fromkeys(CALLS, 0)
    for name in CALLS:
        method = getattr(client, name)

        def wrapper(*a, _m=method, _n=name, **kw):
            seen[_n] += 1
            return _m(*a, **kw)
        setattr(client, name, wrapper)
    return seen


def analyze(db: str) -> None:
    """Gather the planner's statistics, as autovacuum does within a minute of a bulk load on a running store.
    Timed right after the fill without them, PostgreSQL plans MLflow's tag searches as if the tables were
    empty: ~0.3-0.7 s per search instead of ~20-130 ms, which no production store sees."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(db)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("ANALYZE"))
            conn.commit()
    finally:
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, default=250, help="chains of 4 versions (250 -> 1,000 runs/versions)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, fresh_postgres_database("motus_bench") as db, \
            mlflow_server(db, Path(tmp) / "artifacts") as url:
        client = MlflowClient(url)
        rate = fill(client, args.chains)
        analyze(db)
        reg = Registry(url, params=None)
        calls = count_calls(reg.client)
        target = f"models:/motus-aloha/{args.chains // 2}"
        show_s, hops = [], 0
        for _ in range(args.repeat):
            t = time.perf_counter()
            g = lineage.show(reg, target)
            show_s.append(time.perf_counter() - t)
            hops = g["hops"]
        show_calls = sum(calls.values()) / args.repeat
        calls.update(dict.fromkeys(calls, 0))
        uses_s, found = [], 0
        for _ in range(max(1, args.repeat // 4)):
            t = time.perf_counter()
            u = lineage.uses(reg, TIER, SHARED[:12])
            uses_s.append(time.perf_counter() - t)
            found = len(u["versions"])
        uses_calls = sum(calls.values()) / len(uses_s)
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
              f"{len(g['versions'])} versions); {show_med / one:6.1f}x one get_model_version round trip; "
              f"{show_calls:.0f} MLflow calls")
        print(f"lineage uses:  {found / uses_med:8.1f} downstream versions/s ({found} found); "
              f"{uses_med / one:6.1f}x one get_model_version round trip; {uses_calls:.0f} MLflow calls "
              f"(the downstream versions from their lineage tag, not a read of the store)")
        print(f"vs the {TARGET_S:g} s target (<= 1 passes): show {show_med / TARGET_S:.3f}x, "
              f"uses {uses_med / TARGET_S:.3f}x")

if __name__ == "__main__":
    main()
