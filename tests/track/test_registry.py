"""Registry, gates and lineage on a real tiny three-stage chain, on SQLite and on an MLflow server on PostgreSQL.

The chain is the session's (tests/support/chain.py): trained for real once per store (each store holds the
runs of its own jobs): Stage 1, the latent-action VAE and its features, Stage 2, and two Stage 3 fine-tunes
(two learning rates). These tests register it into a copy of the SQLite store, and into the server.
"""

import json
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

import mlflow
import pytest

from motus.config import Gate, load_params
from motus.config import Rule as RuleModel
from motus.contracts import LineageRecord
from motus.data.tier import Tier
from motus.track import lineage
from motus.track.gates import judge
from motus.track.registry import LockTimeout, PromotionRefused, Registry, RegistryError

from ..support.chain import STAGE3, motus

REPO = Path(__file__).resolve().parents[2]
MOTUS = Path(sys.executable).parent / "motus"
pytestmark = pytest.mark.slow



# ----------------------------------------------------------------------------------------------- the chain

class Store:
    def __init__(self, kind: str, uri: str, proj: Path, runs: dict[str, Path]):
        self.kind, self.uri, self.proj, self.runs = kind, uri, proj, runs
        self.params = load_params(proj / "params.yaml")
        self.registry = Registry(uri, self.params)
        self.client = mlflow.MlflowClient(uri)

    def lineage_of(self, key: str) -> LineageRecord:
        return LineageRecord.read(self.runs[key] / "export")


@pytest.fixture(scope="module")
def stores(chains, tmp_path_factory):
    """The session's chain in both stores (a fresh copy of the SQLite one), every export registered."""
    out = {}
    for kind, chain in chains.items():
        uri = chain.fresh_uri(tmp_path_factory.mktemp(f"registry-{kind}"))
        s = out[kind] = Store(kind, uri, chain.proj, chain.runs)
        s.versions = {k: s.registry.register(run) for k, run in s.runs.items()}
    return out


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store(request, stores) -> Store:
    return stores[request.param]


def eval_run(s: Store, success_rate: float) -> str:
    """An evaluation run (what the evaluation room logs) holding eval/success_rate."""
    exp = s.client.get_experiment_by_name("registry-test-eval")
    exp_id = exp.experiment_id if exp else s.client.create_experiment("registry-test-eval")
    run = s.client.create_run(exp_id)
    s.client.log_metric(run.info.run_id, "eval/success_rate", success_rate)
    s.client.set_terminated(run.info.run_id)
    return run.info.run_id


def set_eval(s: Store, version: int, success_rate: float) -> None:
    s.client.set_model_version_tag(STAGE3, str(version), "motus.evaluation_run", eval_run(s, success_rate))


def _promote_at(uri: str, params_file: str, version: int, barrier, queue) -> None:
    reg = Registry(uri, load_params(params_file))
    barrier.wait()
    try:
        reg.promote(STAGE3, version, actor=f"racer-{version}")
        queue.put((version, "won"))
    except PromotionRefused as e:
        queue.put((version, f"refused: {e}"))
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        queue.put((version, f"error: {e!r}"))


# ----------------------------------------------------------------------------------------------- tests

def test_registration_tags_link_the_chain_by_content(store):
    v = store.versions
    assert {k: r.name for k, r in v.items()} == {"s1": "motus-vgm", "lam": "motus-lam", "s2": "motus-latent-action",
                                                 "s3a": STAGE3, "s3b": STAGE3}
    assert isinstance(v["s3a"].version, int) and v["s3b"].version == v["s3a"].version + 1
    s2, s3 = v["s2"].tags, v["s3a"].tags
    assert s2["motus.parent_version"] == f"motus-vgm/{v['s1'].version}"
    assert s2["motus.lam_version"] == f"motus-lam/{v['lam'].version}"
    assert s3["motus.parent_version"] == f"motus-latent-action/{v['s2'].version}"
    assert "motus.parent_version" not in v["s1"].tags
    # own and cumulative device hours are the jobs' own numbers, summed along the ancestry
    hours = {k: store.lineage_of(k).device_hours for k in store.runs}
    assert float(s3["motus.device_hours"]) == pytest.approx(hours["s3a"], rel=1e-6)
    assert float(s3["motus.device_hours_total"]) == pytest.approx(
        hours["s3a"] + hours["s2"] + hours["s1"] + hours["lam"], rel=1e-6)
    assert float(s3["motus.cost"]) == pytest.approx(hours["s3a"] * store.params.costs.device_hour["cpu"], rel=1e-3)
    run = store.client.get_run(v["s3a"].run_id)
    assert s3["motus.code_commit"] == run.data.tags["code.commit"]
    assert store.registry.aliases(STAGE3)["candidate"] == v["s3b"].version
    # the export is the version's source: artifacts `model-<content hash>/` of the version's own run, a path of
    # its own that no other export of that run can overwrite
    path = s3["motus.artifact_path"]
    assert path == f"model-{s3['motus.export_hash'][:16]}" and v["s3a"].source.endswith(f"/{path}")
    names = {a.path for a in store.client.list_artifacts(v["s3a"].run_id, path)}
    assert {f"{path}/model.safetensors", f"{path}/lineage.json", f"{path}/motus_config.json"} <= names


def test_register_is_idempotent_and_fetch_returns_the_export(store, tmp_path):
    before = store.registry.versions(STAGE3)
    again = store.registry.register(store.runs["s3a"] / "export")
    assert again.version == store.versions["s3a"].version and store.registry.versions(STAGE3) == before
    local = store.registry.fetch(f"models:/{STAGE3}/{again.version}", tmp_path / "fetched")
    src = store.runs["s3a"] / "export"
    assert lineage.export_hash(local) == lineage.export_hash(src) == again.tags["motus.export_hash"]
    assert (local / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    # the same run exported again with other timings in its lineage record (what a rerun used to do): a second
    # version whose files sit beside the first's, and both stay fetchable and intact
    redo = tmp_path / "redo"
    shutil.copytree(src, redo)
    record = json.loads((redo / "lineage.json").read_text())
    (redo / "lineage.json").write_text(json.dumps({**record, "device_hours": record["device_hours"] * 2,
                                                   "registered_model": "motus-aloha-redo"}))  # the module's
    # STAGE3 versions and aliases stay as the other tests expect
    second = store.registry.register(redo)
    try:
        assert second.name == "motus-aloha-redo" and second.run_id == again.run_id
        assert second.tags["motus.artifact_path"] != again.tags["motus.artifact_path"]
        first_again = store.registry.fetch(f"models:/{STAGE3}/{again.version}", tmp_path / "first-again")
        assert lineage.export_hash(first_again) == again.tags["motus.export_hash"]
        assert lineage.export_hash(store.registry.fetch(second, tmp_path / "second")) == second.tags["motus.export_hash"]
        # `registry verify`: every version's files against its registered hash; a file changed behind the registry's
        # back is named, the other versions stay intact, and nothing is repaired silently
        assert [(r.version, why) for r, why in store.registry.verify("motus-aloha-redo")] == [(second.version, None)]
        tampered = tmp_path / "tamper" / "lineage.json"
        tampered.parent.mkdir()
        tampered.write_text("{}")
        store.client.log_artifact(second.run_id, str(tampered), second.tags["motus.artifact_path"])
        ((_, why),) = store.registry.verify("motus-aloha-redo")
        assert why and "does not match its registered hash" in why
        assert all(why is None for _, why in store.registry.verify(STAGE3))
        r = motus(store.proj, store.uri, "registry", "verify", "motus-aloha-redo", "--json", check=False)
        assert r.returncode == 1 and json.loads(r.stdout)[0]["ok"] is False
        assert motus(store.proj, store.uri, "registry", "verify", STAGE3, check=False).returncode == 0
    finally:  # the module's other tests list every model
        store.client.delete_registered_model("motus-aloha-redo")
    with pytest.raises(RegistryError, match="no version 99"):
        store.registry.version(STAGE3, 99)
    with pytest.raises(RegistryError, match="no alias 'nope'"):
        store.registry.resolve(f"models:/{STAGE3}@nope")


def test_gated_promotion_race_comparison_rollback(store):
    reg, a, b = store.registry, store.versions["s3a"].version, store.versions["s3b"].version
    with pytest.raises(PromotionRefused, match="has no verdict"):
        reg.promote(STAGE3, a)
    verdict = reg.evaluate(STAGE3, a)  # no evaluation run yet
    assert not verdict.passed and [r.metric for r in verdict.failed_rules] == ["eval/success_rate"]
    with pytest.raises(PromotionRefused, match="eval/success_rate.*metric eval/success_rate was not logged"):
        reg.promote(STAGE3, a)
    tags = reg.version(STAGE3, a).tags  # recorded rule by rule, with the JSON artifact on the run
    assert tags["motus.verdict"] == "fail" and tags["motus.verdict.rule.1.eval/success_rate"].startswith("fail")
    assert tags["motus.verdict.rule.0.val/action_loss"].startswith("pass")
    arts = [x.path for x in store.client.list_artifacts(store.versions["s3a"].run_id, "registry/verdicts")]
    assert any(p.endswith(".json") for p in arts)

    # two passing versions judged against the same (absent) champion, promoted at the same moment
    set_eval(store, a, 0.50)
    set_eval(store, b, 0.60)
    assert reg.evaluate(STAGE3, a).passed and reg.evaluate(STAGE3, b).passed
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_promote_at, args=(store.uri, str(store.proj / "params.yaml"), v, barrier, queue))
             for v in (a, b)]
    for p in procs:
        p.start()
    outcomes = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    winners = [v for v, o in outcomes.items() if o == "won"]
    assert len(winners) == 1, outcomes
    winner, loser = winners[0], ({a, b} - set(winners)).pop()
    assert "champion moved" in outcomes[loser]
    assert reg.champion(STAGE3).version == winner

    # champion comparison: worse than the champion by more than max_regression is refused, with the reason
    champion_rate = 0.50 if winner == a else 0.60
    set_eval(store, loser, champion_rate - 0.20)
    v = reg.evaluate(STAGE3, loser)
    assert not v.passed and v.champion_version == winner
    assert v.failed_rules[0].champion_value == pytest.approx(champion_rate)
    with pytest.raises(PromotionRefused, match=rf"eval/success_rate.*worse than champion v{winner}"):
        reg.promote(STAGE3, loser)
    set_eval(store, loser, champion_rate + 0.10)
    assert reg.evaluate(STAGE3, loser).passed
    reg.promote(STAGE3, loser, actor="alice")
    assert reg.champion(STAGE3).version == loser

    restored = reg.rollback(STAGE3, actor="bob")
    assert restored.version == winner and reg.champion(STAGE3).version == winner
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback(STAGE3)
    moves = [(e["action"], e["alias"], e["from"], e["to"]) for e in reg.history(STAGE3)]
    assert moves[-3:] == [("promote", "champion", None, winner), ("promote", "champion", winner, loser),
                          ("rollback", "champion", loser, winner)]
    assert [e["actor"] for e in reg.history(STAGE3)[-3:]] == [f"racer-{winner}", "alice", "bob"]


def test_an_alias_moved_outside_the_platform_is_refused_flagged_and_repaired(store, monkeypatch):
    """Aliases moved with the raw MLflow client (no audit entry): nothing decides on them, every listing flags
    them, `verify` fails, and `verify --repair` puts back what the audit trail says, auditing the repair."""
    from typer.testing import CliRunner

    from motus.cli import app
    from motus.pipeline import Pipeline, PipelineError
    from motus.track.registry import AliasState, UnverifiedAlias

    reg, client, s2 = store.registry, store.client, "motus-latent-action"
    champ = reg.champion(STAGE3).version  # the previous test's champion, audited
    other = ({store.versions["s3a"].version, store.versions["s3b"].version} - {champ}).pop()
    candidate = reg.aliases(STAGE3)["candidate"]
    seq = reg.history(STAGE3)[-1]["seq"]
    # behind the platform's back: the champion moved, the candidate deleted, and a champion given to a model
    # whose audit never had one (Stage 2: what `pipeline run --from stage3` would train Stage 3 on)
    client.set_registered_model_alias(STAGE3, "champion", str(other))
    client.delete_registered_model_alias(STAGE3, "candidate")
    client.set_registered_model_alias(s2, "champion", str(store.versions["s2"].version))
    states = {s.alias: s for s in reg.alias_states(STAGE3)}
    assert states == {"champion": AliasState("champion", other, champ), "candidate": AliasState("candidate", None, candidate)}
    assert reg.history(STAGE3)[-1]["seq"] == seq  # the trail knows nothing of it

    fix = rf"`motus registry verify {STAGE3} --repair`"
    with pytest.raises(UnverifiedAlias, match=rf"'{STAGE3}': UNVERIFIED: champion -> v{other} set outside the platform; "
                                              rf"audited: v{champ}.*{fix}"):
        reg.champion(STAGE3)
    with pytest.raises(UnverifiedAlias, match=f"champion -> v{other}"):  # no gate judges against it
        reg.evaluate(STAGE3, other)
    with pytest.raises(UnverifiedAlias):  # nor promotes or rolls back from it
        reg.promote(STAGE3, other)
    with pytest.raises(UnverifiedAlias, match="audited: none"):
        reg.resolve(f"models:/{s2}@champion")
    # the pipeline's lookup of a champion (`--from` a later step: the gate's output as the registry has it now)
    monkeypatch.setenv("MOTUS_TRACKING_URI", store.uri)
    pipe = Pipeline(store.proj / "params.yaml", root=store.proj, echo=lambda _: None)
    for model, live in ((STAGE3, other), (s2, store.versions["s2"].version)):
        step = pipe.by_name[f"gate:{model}"]
        with pytest.raises(PipelineError, match=rf"gate:{model}: '{model}': UNVERIFIED: champion -> v{live}"):
            pipe.kind_of(step).current(pipe, step)
    # the pipeline's summary shows no champion for them, and says why
    assert pipe.champions()[STAGE3] is None and pipe.champions()[s2] is None
    assert pipe.unverified_champions[STAGE3] == f"UNVERIFIED: champion -> v{other} set outside the platform; audited: v{champ}"

    def cli(*args: str):
        return CliRunner().invoke(app, ["registry", *args, "--tracking-uri", store.uri,
                                        "--params", str(store.proj / "params.yaml")])

    monkeypatch.setenv("COLUMNS", "250")
    listed = {m["model"]: m for m in json.loads(cli("list", "--json").stdout)}
    assert listed[STAGE3]["unverified"] == [f"UNVERIFIED: candidate deleted outside the platform; audited: v{candidate}",
                                            f"UNVERIFIED: champion -> v{other} set outside the platform; audited: v{champ}"]
    assert listed[s2]["unverified"] == [f"UNVERIFIED: champion -> v{store.versions['s2'].version} set outside the "
                                        "platform; audited: none"]
    assert listed["motus-vgm"]["unverified"] == []
    shown = cli("list", STAGE3).stdout
    assert "champion (UNVERIFIED)" in shown and f"audited: v{champ}" in shown
    history = cli("history", STAGE3)
    assert history.exit_code == 0 and f"UNVERIFIED: champion -> v{other} set outside the platform; audited: v{champ}" \
        in history.stdout
    r = cli("verify", STAGE3, "--json")
    assert r.exit_code == 1
    assert [(x["alias"], x["live"], x["audited"], x["ok"]) for x in json.loads(r.stdout) if "alias" in x] == [
        ("candidate", None, candidate, False), ("champion", other, champ, False)]
    assert reg.unverified(STAGE3) and reg.aliases(STAGE3) == {"champion": other}  # verify alone changes nothing

    r = cli("verify", "--repair", "--actor", "carol")
    assert r.exit_code == 0, r.output
    assert f"{STAGE3}: UNVERIFIED: champion -> v{other} set outside the platform; audited: v{champ} -> repaired" in r.stdout
    assert reg.unverified() == [] and reg.champion(STAGE3).version == champ and reg.champion(s2) is None
    assert reg.aliases(STAGE3) == {"champion": champ, "candidate": candidate}
    repairs = [(e["action"], e["alias"], e["from"], e["to"], e["actor"]) for e in reg.history(STAGE3)[-2:]]
    assert repairs == [("repair", "candidate", None, candidate, "carol"), ("repair", "champion", other, champ, "carol")]
    assert reg.history(STAGE3)[-1]["found"].startswith(f"UNVERIFIED: champion -> v{other}")
    assert [(e["action"], e["from"], e["to"]) for e in reg.history(s2)[-1:]] == [("repair", store.versions["s2"].version, None)]
    assert "repair" in cli("history", STAGE3).stdout and cli("verify", STAGE3).exit_code == 0
    # the champion stack is as before: a rollback still finds no champion before this one
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback(STAGE3)


def test_lineage_walks_back_to_the_bases_with_the_real_hashes(store, tmp_path):
    v = store.versions
    graph = lineage.show(store.registry, f"models:/{STAGE3}/{v['s3a'].version}")
    nodes = {n["model"]: n for n in graph["versions"]}
    assert set(nodes) == {STAGE3, "motus-latent-action", "motus-vgm", "motus-lam"}
    for key, model in (("s1", "motus-vgm"), ("s2", "motus-latent-action"), ("s3a", STAGE3), ("lam", "motus-lam")):
        lin, node = store.lineage_of(key), nodes[model]
        ckpt = store.runs[key] / "checkpoints" / "step-000002" / "manifest.json"
        assert node["checkpoint_hash"] == json.loads(ckpt.read_text())["content_hash"]
        assert node["config_hash"] == lin.config_hash and node["run_id"] == lin.run_id
        for t in node["tiers"]:
            assert t["content_hash"] == Tier(store.proj / "data" / "tiers" / t["name"]).content_hash
    assert {(t["name"], t["level"]) for t in nodes["motus-latent-action"]["tiers"]} == {
        ("task-agnostic-aloha", 4), ("target-aloha-transfer", 6)}
    assert nodes["motus-vgm"]["pretrained_bases"] and nodes["motus-lam"]["pretrained_bases"]
    assert not nodes[STAGE3]["pretrained_bases"]
    assert graph["totals"]["device_hours"] == pytest.approx(
        sum(store.lineage_of(k).device_hours for k in ("s1", "lam", "s2", "s3a")), rel=1e-6)
    path = lineage.attach_picture(store.registry, graph, tmp_path / "lineage.png")
    assert (tmp_path / "lineage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path in {a.path for a in store.client.list_artifacts(v["s3a"].run_id, "lineage")}


def test_lineage_uses_finds_everything_downstream_of_a_tier(store):
    tier_hash = Tier(store.proj / "data" / "tiers" / "task-agnostic-aloha").content_hash
    found = lineage.uses(store.registry, "task-agnostic-aloha", tier_hash[:10])
    by_uri = {x["uri"]: x for x in found["versions"]}
    v = store.versions
    assert set(by_uri) == {r.uri for r in v.values()}
    assert by_uri[v["s1"].uri]["direct"] and by_uri[v["lam"].uri]["direct"] and not by_uri[v["s3a"].uri]["direct"]
    direct_runs = {r["run_id"] for r in found["runs"] if r["direct"]}
    assert direct_runs == {v[k].run_id for k in ("s1", "lam", "s2")}
    assert {c["hash"] for c in found["checkpoints"]} == {r.tags["motus.checkpoint_hash"] for r in v.values()}
    other = lineage.uses(store.registry, "target-aloha-transfer")
    assert {x["uri"] for x in other["versions"]} == {v[k].uri for k in ("lam", "s2", "s3a", "s3b")}
    assert lineage.uses(store.registry, "task-agnostic-aloha", "0000dead")["versions"] == []


def test_lock_is_exclusive_and_a_stale_one_is_broken(store):
    impatient = Registry(store.uri, store.params, lock_wait=0.5)
    with store.registry.lock(STAGE3):
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match=f"{STAGE3}.lock"):
            with impatient.lock(STAGE3):
                pass
        assert time.monotonic() - t0 >= 0.5
    # a holder that died: its lock is older than the TTL and the next contender breaks it
    store.client.create_registered_model(f"{STAGE3}.lock", tags={"motus.lock.owner": "dead",
                                                                  "motus.lock.acquired_at": f"{time.time() - 3600}"})
    with Registry(store.uri, store.params, lock_wait=5).lock(STAGE3):
        owner = store.client.get_registered_model(f"{STAGE3}.lock").tags["motus.lock.owner"]
        assert owner != "dead"
    assert STAGE3 + ".lock" not in {m.name for m in store.client.search_registered_models()}
    # a lock whose tags are not visible yet is as old as its creation, not 57 years: a contender waits
    store.client.create_registered_model(f"{STAGE3}.lock")
    with pytest.raises(LockTimeout):
        with Registry(store.uri, store.params, lock_ttl=30, lock_wait=1).lock(STAGE3):
            pass
    store.client.delete_registered_model(f"{STAGE3}.lock")
    # a holder alive past the TTL keeps its lock by its heartbeat: a patient contender waits for the release
    import threading

    beating = Registry(store.uri, store.params, lock_ttl=1.5, lock_wait=30)
    order = []

    def contender():
        with beating.lock(STAGE3, owner="next"):
            order.append("next")

    with beating.lock(STAGE3, owner="long"):
        other = threading.Thread(target=contender)
        other.start()
        time.sleep(4)  # more than twice the TTL
        order.append("long done")
    other.join(30)
    assert order == ["long done", "next"]


def test_cli(store, monkeypatch):
    proj, uri = store.proj, store.uri
    r = motus(proj, uri, "registry", "promote", "motus-vgm", "1", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: motus-vgm v1 has no verdict") and "Traceback" not in r.stderr
    r = motus(proj, uri, "registry", "evaluate", STAGE3, "7", check=False)
    assert r.returncode == 1 and f"'{STAGE3}' has no version 7" in r.stderr
    listed = json.loads(motus(proj, uri, "registry", "list", "--json").stdout)
    assert {m["model"] for m in listed} == {"motus-vgm", "motus-lam", "motus-latent-action", STAGE3}
    # one model's versions, each with its own held-out numbers beside the zero-action floor of the same windows
    versions = json.loads(motus(proj, uri, "registry", "list", STAGE3, "--json").stdout)
    assert versions and all({"val/vla_action_mse", "val/floor_zero_action_mse"} <= set(v["metrics"]) for v in versions)
    monkeypatch.setenv("COLUMNS", "300")
    assert "x floor" in motus(proj, uri, "registry", "list", STAGE3).stdout
    champion = store.registry.champion(STAGE3)
    shown = json.loads(motus(proj, uri, "lineage", "show", f"models:/{STAGE3}@champion", "--json").stdout)
    assert shown["root"] == f"{STAGE3}/{champion.version}" and len(shown["versions"]) == 4
    monkeypatch.setenv("COLUMNS", "80")
    tree = motus(proj, uri, "lineage", "show", f"models:/{STAGE3}@champion", "--no-attach").stdout
    assert max(len(line) for line in tree.splitlines()) <= 80, tree
    for node in shown["versions"]:  # every version, and each of its tiers by one hash: the content hash
        assert f"{node['model']} v{node['version']}" in tree
        for t in node["tiers"]:
            assert f"tier {t['name']} L{t['level']} {t['content_hash'][:12]}" in tree
    history = json.loads(motus(proj, uri, "registry", "history", STAGE3, "--json").stdout)
    assert history == store.registry.history(STAGE3)
    r = motus(proj, uri, "registry", "register", str(proj), check=False)
    assert r.returncode == 1 and "lineage.json is missing" in r.stderr
    used = json.loads(motus(proj, uri, "lineage", "uses", "target-aloha-transfer", "--json").stdout)
    assert len(used["versions"]) == 4


# ----------------------------------------------------------------------------------------------- pure gates

def test_judge_rules_without_a_store():
    gate = Gate(rules=[RuleModel(metric="val/video_loss", comparator="<=", threshold=2.5, max_regression=0.1)])
    ok = judge("m", 2, gate, {"val/video_loss": 1.0}, {"val/video_loss": 0.95}, 1)
    assert ok.passed and ok.champion_version == 1
    worse = judge("m", 2, gate, {"val/video_loss": 1.2}, {"val/video_loss": 1.0}, 1)
    assert not worse.passed and "worse than champion v1" in worse.rules[0].reason
    over = judge("m", 2, gate, {"val/video_loss": 3.0}, None, None)
    assert not over.passed and "is not <= 2.5" in over.rules[0].reason
    nan = judge("m", 2, gate, {"val/video_loss": float("nan")}, None, None)
    assert not nan.passed and "NaN" in nan.rules[0].reason
    higher = RuleModel(metric="acc", comparator=">=", threshold=0.5, max_regression=0.1)
    gate2 = Gate(rules=[higher], required_tags=["owner"])
    v = judge("m", 1, gate2, {"acc": 0.55}, {"acc": 0.7}, 3, {"owner": "x"})
    assert not v.passed and v.failed_rules[0].metric == "acc"
    assert judge("m", 1, gate2, {"acc": 0.65}, {"acc": 0.7}, 3, {}).failed_rules[0].reason == "required tag owner is missing"
    assert type(v).from_json(v.to_json()) == v


def test_a_rule_relative_to_another_metric_of_the_same_evaluation():
    gate = Gate(rules=[RuleModel(metric="eval/vla_action_mse", comparator="<=", relative_to="eval/floor_zero_action_mse",
                                 factor=0.7)])
    floor = 0.9
    untrained = judge("m", 1, gate, {"eval/vla_action_mse": 1 + floor, "eval/floor_zero_action_mse": floor}, None, None)
    (rule,) = untrained.rules
    assert not untrained.passed and rule.bound == pytest.approx(0.63)
    assert "1.9 is not <= 0.7 x eval/floor_zero_action_mse 0.9 = 0.63" in rule.reason  # by how much, against what
    trained = judge("m", 1, gate, {"eval/vla_action_mse": 0.5, "eval/floor_zero_action_mse": floor}, None, None)
    assert trained.passed
    missing = judge("m", 1, gate, {"eval/vla_action_mse": 0.5}, None, None)
    assert not missing.passed and "eval/floor_zero_action_mse was not logged" in missing.rules[0].reason
    assert type(untrained).from_json(untrained.to_json()) == untrained


def test_a_score_that_may_be_negative_is_judged_against_its_baseline_plus_a_margin():
    """The latent-action VAE's gate: the held-out probe R^2 against the same probe on the untrained VAE."""
    gate = Gate(rules=[RuleModel(metric="lam/probe_r2", comparator=">=", relative_to="lam/untrained_probe_r2",
                                 offset=0.05)])
    untrained = judge("m", 1, gate, {"lam/probe_r2": -0.2, "lam/untrained_probe_r2": -0.2}, None, None)
    (rule,) = untrained.rules
    assert not untrained.passed and rule.bound == pytest.approx(-0.15)
    assert "-0.2 is not >= 1 x lam/untrained_probe_r2 -0.2 + 0.05 = -0.15" in rule.reason
    assert judge("m", 1, gate, {"lam/probe_r2": 0.1, "lam/untrained_probe_r2": -0.2}, None, None).passed
    with pytest.raises(ValueError, match="offset is added to factor x relative_to"):
        RuleModel(metric="lam/probe_r2", comparator=">=", threshold=0.1, offset=0.05)


def test_a_success_rate_is_judged_through_its_confidence_interval():
    from motus.contracts import rate_interval

    at_least = RuleModel(metric="eval/success_rate", comparator=">=", threshold=0.5, statistic="wilson",
                         min_episodes=8)
    gate = Gate(rules=[at_least])
    # 7/8 = 0.875 clears 0.5 as a fraction, but its 95% Wilson lower bound (0.529) must clear it too
    seen = {"eval/success_rate": 7 / 8, "eval/success_rate_n": 8}
    v = judge("m", 1, gate, seen, None, None)
    (r,) = v.rules
    assert v.passed and (r.n, r.k) == (8, 7) and r.interval == pytest.approx(rate_interval(7, 8))
    assert r.interval[0] == pytest.approx(0.529, abs=1e-3)
    five = judge("m", 1, gate, {"eval/success_rate": 5 / 8, "eval/success_rate_n": 8}, None, None)
    assert not five.passed and "lower bound 0.306 is not >= 0.5" in five.rules[0].reason
    few = judge("m", 1, gate, {"eval/success_rate": 1.0, "eval/success_rate_n": 4}, None, None)
    assert not few.passed and "fewer than min_episodes 8" in few.rules[0].reason  # too few never passes
    no_n = judge("m", 1, gate, {"eval/success_rate": 1.0}, None, None)
    assert not no_n.passed and "eval/success_rate_n" in no_n.rules[0].reason
    # against the champion: only a candidate confidently worse than the champion (minus the margin) fails
    vs = Gate(rules=[RuleModel(metric="eval/success_rate", comparator=">=", max_regression=0.05,
                               statistic="clopper-pearson")])
    champ = {"eval/success_rate": 0.75, "eval/success_rate_n": 8}
    assert judge("m", 2, vs, {"eval/success_rate": 0.5, "eval/success_rate_n": 8}, champ, 1).passed
    worse = judge("m", 2, vs, {"eval/success_rate": 0.1, "eval/success_rate_n": 40}, champ, 1)
    assert not worse.passed and "confidently worse" in worse.rules[0].reason
    assert type(worse).from_json(worse.to_json()) == worse


def test_rate_intervals_match_the_textbook_values():
    from motus.contracts import rate_interval

    assert rate_interval(5, 10, method="clopper-pearson") == pytest.approx((0.1871, 0.8129), abs=1e-4)
    assert rate_interval(3, 20, method="clopper-pearson") == pytest.approx((0.0321, 0.3789), abs=1e-4)
    assert rate_interval(0, 10, method="clopper-pearson") == pytest.approx((0.0, 0.3085), abs=1e-4)
    assert rate_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # Wilson
    assert rate_interval(10, 10)[1] == 1.0
