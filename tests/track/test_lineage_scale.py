"""Lineage in a busy store without training: `show` and `uses` make a bounded number of MLflow calls, the same
for 48 and for 200 versions, and answer what a walk one version at a time answers (issue 19, item 3).

The store is SQLite in a temporary folder, filled with synthetic chains carrying the tags registration writes
(tests/support/lineage_store.py, shared with benchmarks/lineage.py)."""

from __future__ import annotations

import os
from collections import Counter, deque

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from motus.track import lineage  # noqa: E402
from motus.track.registry import Registry  # noqa: E402
from motus.track.tags import T, tier_hash_keys  # noqa: E402

from ..support.lineage_store import SHARED, TIER, fill, h  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, raised inside MLflow

CALLS = ("search_model_versions", "search_runs", "search_experiments", "get_model_version", "get_registered_model",
         "get_run", "get_model_version_by_alias")


def counted(reg: Registry, monkeypatch) -> Counter:
    """Count the calls the registry's MLflow client makes, by method."""
    seen: Counter = Counter()
    for name in CALLS:
        method = getattr(reg.client, name)

        def wrapper(*a, _m=method, _n=name, **kw):
            seen[_n] += 1
            return _m(*a, **kw)
        monkeypatch.setattr(reg.client, name, wrapper)
    return seen


# ------------------------------------------------------------------ the walk one version at a time (the oracle)

def show_per_version(reg: Registry, uri: str) -> dict:
    """`show` as it was: every parent read on its own."""
    root = reg.resolve(uri)
    nodes, edges, todo = {}, [], deque([root])
    while todo:
        ref = todo.popleft()
        key = f"{ref.name}/{ref.version}"
        if key in nodes:
            continue
        node = nodes[key] = lineage.version_node(ref)
        for p in node["parents"]:
            edges.append({"from": key, "to": p["version"] or f"export:{p.get('export_hash', '')[:12]}",
                          "role": p["role"]})
            if p["version"]:
                name, _, version = p["version"].rpartition("/")
                todo.append(reg.version(name, int(version)))
    return {"versions": list(nodes.values()), "edges": edges}


def uses_per_version(reg: Registry, tier: str, digest: str | None) -> tuple[set, set, set]:
    """`uses` as it was: a search per run and per version reached. Returns (versions, direct ones, direct runs)."""
    pattern = f"{digest}%" if digest else "%"
    direct = {}
    for key in tier_hash_keys(tier):
        for ref in reg.versions(None, {key: pattern}):
            direct[f"{ref.name}/{ref.version}"] = ref
    exps = [e.experiment_id for e in reg.client.search_experiments()]
    runs = {r.info.run_id for r in reg.client.search_runs(exps, f"tags.`tier.{tier}.digest` LIKE '{pattern}'",
                                                         max_results=10000)}
    runs |= {ref.run_id for ref in direct.values()}
    for run_id in runs:
        for ref in reg.versions(run_id=run_id):
            direct.setdefault(f"{ref.name}/{ref.version}", ref)
    found, todo = set(direct), deque(direct)
    while todo:
        key = todo.popleft()
        for tag in ("parent_version", "lam_version"):
            for child in reg.versions(None, {f"{T}{tag}": key}):
                if f"{child.name}/{child.version}" not in found:
                    found.add(f"{child.name}/{child.version}")
                    todo.append(f"{child.name}/{child.version}")
    return found, set(direct), runs


# ------------------------------------------------------------------------------------------------ the store

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('lineage-scale')}/mlflow.db"
    client = MlflowClient(uri)
    fill(client, 12, workers=1, metrics=False)  # 48 versions
    return uri, client


def test_show_and_uses_make_the_same_few_calls_for_48_and_200_versions(store, monkeypatch):
    uri, client = store
    calls = {}
    for chains in (12, 50):
        if chains == 50:
            fill(client, 38, start=12, workers=1, metrics=False)  # 200 versions
        reg = Registry(uri)
        assert len(reg.versions()) == chains * 4
        seen = counted(reg, monkeypatch)
        graph = lineage.show(reg, "models:/motus-aloha/1")
        shown = dict(seen)
        seen.clear()
        found = lineage.uses(reg, TIER, SHARED[:12])
        calls[chains] = (shown, dict(seen))
        assert graph["totals"]["versions"] == 4 and graph["hops"] == 3
        assert len(found["versions"]) == 4 * len(range(0, chains, 10))
        monkeypatch.undo()
    assert calls[12] == calls[50], calls
    shown, used = calls[50]
    # show: resolve (model + version), then one search per model and generation (aloha <- s2 <- vgm + lam)
    assert shown == {"get_registered_model": 1, "get_model_version": 1, "search_model_versions": 3}, shown
    # uses: three tier-tag searches, one of the lineage tag, the runs that read the tier (experiments + runs)
    assert used == {"search_model_versions": 4, "search_experiments": 1, "search_runs": 1}, used


def test_answers_equal_the_walk_one_version_at_a_time(store, monkeypatch):
    uri, client = store
    # shapes the filler lacks: two children of one version, a fine-tune of a fine-tune, versions far apart
    run = client.create_run(client.get_experiment_by_name("lineage-bench").experiment_id,
                            tags={f"tier.{TIER}.digest": SHARED})
    s2 = "motus-latent-action/1"
    tags = {f"{T}stage": "motus-aloha", f"{T}checkpoint_hash": h("extra"), f"{T}parent_version": s2}
    a = client.create_model_version("motus-aloha", "s3://x/a", run_id=run.info.run_id, tags=tags)
    b = client.create_model_version("motus-aloha", "s3://x/b", tags={**tags, f"{T}parent_version": f"motus-aloha/{a.version}",
                                                                    f"{T}lam_version": "motus-lam/1"})
    c = client.create_model_version("motus-aloha", "s3://x/c", tags={**tags, f"{T}parent_version": f"motus-aloha/{b.version}"})
    reg = Registry(uri)
    for uri_ in (f"models:/motus-aloha/{c.version}", "models:/motus-aloha/1", "models:/motus-aloha/3",
                 "models:/motus-vgm/2"):
        fast, slow = lineage.show(reg, uri_), show_per_version(reg, uri_)
        assert fast["versions"] == slow["versions"] and fast["edges"] == slow["edges"], uri_
    assert lineage.show(reg, f"models:/motus-aloha/{c.version}")["hops"] == 6
    for digest in (SHARED[:12], h("tier", 7)[:8], None, "0000dead"):
        found = lineage.uses(reg, TIER, digest)
        versions, direct, runs = uses_per_version(reg, TIER, digest)
        assert {f"{v['model']}/{v['version']}" for v in found["versions"]} == versions, digest
        assert {f"{v['model']}/{v['version']}" for v in found["versions"] if v["direct"]} == direct, digest
        assert {r["run_id"] for r in found["runs"] if r["direct"]} == runs, digest
        for r in found["runs"]:  # every version is listed under its run
            assert all(next(v for v in found["versions"] if v["uri"] == f"models:/{k}")["run_id"] == r["run_id"]
                       for k in r["versions"])
    assert lineage.uses(reg, TIER, "0000dead") == {"tier": TIER, "digest": "0000dead", "runs": [], "versions": [],
                                                    "checkpoints": []}
    # a parent link to a version that is not there fails as it did, naming it
    client.create_model_version("motus-aloha", "s3://x/d", tags={f"{T}parent_version": "motus-vgm/999"})
    with pytest.raises(Exception, match="no version 999"):
        lineage.show(reg, f"models:/motus-aloha/{int(c.version) + 1}")
    # one generation holding versions of one model far apart: read as two ranges, the same answer
    far = client.create_model_version("motus-aloha", "s3://x/e", tags={f"{T}parent_version": "motus-aloha/2",
                                                                      f"{T}lam_version": "motus-aloha/40"})
    monkeypatch.setattr(lineage, "_RANGE_GAP", 4)
    seen = counted(reg, monkeypatch)
    fast = lineage.show(reg, f"models:/motus-aloha/{far.version}")
    assert seen["search_model_versions"] == 2 + 2 + 4  # aloha 2 and 40, their Stage 2 parents, vgm and lam
    slow = show_per_version(reg, f"models:/motus-aloha/{far.version}")
    assert fast["versions"] == slow["versions"] and fast["edges"] == slow["edges"]
