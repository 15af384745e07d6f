"""motus.track: MlflowTracker on a real MLflow SQLite store (no server), and run accounting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

from motus.track import MlflowTracker, ParamConflictError, cost, device_hours, git_state  # noqa: E402
from motus.track.tracker import (  # noqa: E402
    MAX_PARAM_VALUE_LENGTH,
    PARAM_TRUNCATION_MARKER,
    PARAMS_ARTIFACT,
    flatten_params,
    resolve_tracking_uri,
)
from motus.train.tracking import Tracker  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, raised inside MLflow

CONFIG = {
    "project": {"name": "motus"},
    "stages": {
        "stage1": {"lr": 1e-4, "tiers": ["sim_l1", "sim_l2"], "experts": {"video": True, "action": False}},
        "stage2": {"lr": 3e-4, "steps": 100},
    },
    "prompt": "p" * (MAX_PARAM_VALUE_LENGTH + 500),
    "empty": {},
}


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow database: creating the schema costs ~1 s, copying it costs nothing."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _store_copy(template_db: Path, folder: Path) -> str:
    folder.mkdir(parents=True)
    shutil.copy(template_db, folder / "mlflow.db")
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture
def uri(tmp_path: Path, template_db: Path) -> str:
    return _store_copy(template_db, tmp_path / "store")


def _tracker(uri: str, **kw) -> MlflowTracker:
    kw.setdefault("system_metrics", False)
    return MlflowTracker(uri, "motus-test", **kw)


def _artifacts_dir(tmp_path: Path, run_id: str) -> Path:
    return tmp_path / "store" / "mlartifacts" / run_id / "artifacts"


def test_is_a_tracker(uri):
    with _tracker(uri) as t:
        tracker: Tracker = t  # static check that the protocol is met
        assert isinstance(tracker.run_id, str)


def test_flatten_params():
    flat = flatten_params({"a": {"b": 1, "c": [1, {"d": None}], "e": {}, "f": []}, "bad key!": True})
    assert flat == {"a.b": "1", "a.c.0": "1", "a.c.1.d": "None", "a.e": "{}", "a.f": "[]", "bad key_": "True"}


def test_params_flattened_truncated_and_json_artifact(uri, tmp_path):
    with _tracker(uri) as t:
        t.log_params(CONFIG)
        t.log_params({"launch": {"nodes": 1}})  # a second call adds keys and merges into the JSON
    client = MlflowClient(uri)
    params = client.get_run(t.run_id).data.params
    assert params["stages.stage1.lr"] == "0.0001"
    assert params["stages.stage1.tiers.1"] == "sim_l2"
    assert params["stages.stage1.experts.action"] == "False"
    assert params["empty"] == "{}"
    assert params["launch.nodes"] == "1"
    assert len(params["prompt"]) == MAX_PARAM_VALUE_LENGTH
    assert params["prompt"].endswith(PARAM_TRUNCATION_MARKER)
    saved = json.loads((_artifacts_dir(tmp_path, t.run_id) / PARAMS_ARTIFACT).read_text())
    assert saved == {**CONFIG, "launch": {"nodes": 1}}  # nothing lost, the long value in full


def test_many_params_are_batched(uri):
    many = {f"k{i:03d}": i for i in range(250)}  # > 100 per log_batch
    with _tracker(uri) as t:
        t.log_params({"many": many})
    assert len(MlflowClient(uri).get_run(t.run_id).data.params) == 250


def test_metrics_history(uri):
    with _tracker(uri) as t:
        for step in range(5):
            t.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 1e-4, "val/loss": None}, step=step)
        t.log_metrics({"train/grad_norm": float("nan")}, step=5)
        t.log_metrics({"train/loss": np.float32(0.1)}, step=5)  # numpy scalars are numbers too
        with pytest.raises(TypeError, match="train/bad"):
            t.log_metrics({"train/bad": "high"}, step=6)
    client = MlflowClient(uri)
    history = client.get_metric_history(t.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4, 5]
    assert history[1].value == pytest.approx(0.5)
    assert client.get_metric_history(t.run_id, "val/loss") == []
    assert np.isnan(client.get_metric_history(t.run_id, "train/grad_norm")[0].value)


def test_dataset_inputs_with_digests(uri, tmp_path):
    sha = "ab" * 32  # a 64-character sha256 tier hash
    with _tracker(uri) as t:
        t.log_dataset("sim_l1", sha, str(tmp_path / "tiers" / "sim_l1"), extra={"episodes": 12})
        t.log_dataset("sim_l2", "d41d8cd98f00b204e9800998ecf8427e", "s3://bucket/tiers/sim_l2", context="validation")
        t.log_dataset("sim_l3", "0123abcd", "sim:metaworld")  # no MLflow resolver: kept as its URI
    run = MlflowClient(uri).get_run(t.run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"sim_l1", "sim_l2", "sim_l3"}
    l1, l2, l3 = inputs["sim_l1"], inputs["sim_l2"], inputs["sim_l3"]
    assert l1.dataset.digest == sha[:36]  # MLflow's digest limit; the full hash is in the tag and profile
    assert json.loads(l1.dataset.profile) == {"episodes": 12, "digest": sha}
    assert json.loads(l1.dataset.source)["uri"] == str(tmp_path / "tiers" / "sim_l1")
    assert l2.dataset.digest == "d41d8cd98f00b204e9800998ecf8427e"
    assert l2.dataset.source_type == "s3"
    assert json.loads(l3.dataset.source) == {"uri": "sim:metaworld"}
    assert {tag.key: tag.value for tag in l1.tags} == {"mlflow.data.context": "training"}
    assert {tag.key: tag.value for tag in l2.tags} == {"mlflow.data.context": "validation"}
    assert run.data.tags["tier.sim_l1.digest"] == sha
    assert run.data.tags["tier.sim_l2.digest"] == "d41d8cd98f00b204e9800998ecf8427e"


def test_artifacts_image_curve_and_directory(uri, tmp_path):
    image = np.zeros((16, 24, 3), np.uint8)
    image[:, :, 0] = 255
    ckpt = tmp_path / "ckpt"
    (ckpt / "shards").mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    (ckpt / "shards" / "0.bin").write_bytes(b"\0" * 10)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with _tracker(uri) as t:
        t.log_image(image, "samples/step_10")
        t.log_loss_curve({"train": [(0, 2.0), (1, 1.0), (2, 0.5)], "val": [(2, 0.8), (1, float("nan"))]})
        t.log_loss_curve({"signed": [(0, -1.0), (1, 1.0)]}, name="curves/signed.png")  # linear y
        t.log_artifact(ckpt, "checkpoints")
        t.log_artifact(note)
        with pytest.raises(ValueError, match="uint8"):
            t.log_image(image.astype(np.float32), "bad")
        with pytest.raises(FileNotFoundError):
            t.log_artifact(tmp_path / "missing")
    root = _artifacts_dir(tmp_path, t.run_id)
    assert t.artifact_uri == root.as_uri()
    with Image.open(root / "samples" / "step_10.png") as png:
        assert png.format == "PNG"
        assert np.array_equal(np.asarray(png.convert("RGB")), image)
    for curve in (root / "loss_curve.png", root / "curves" / "signed.png"):
        assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(curve) as png:
            assert png.size == (800, 500)
    assert (root / "checkpoints" / "ckpt" / "shards" / "0.bin").read_bytes() == b"\0" * 10
    assert (root / "checkpoints" / "ckpt" / "meta.json").exists()
    assert (root / "note.txt").read_text() == "hello"
    listed = {a.path for a in MlflowClient(uri).list_artifacts(t.run_id, "checkpoints/ckpt")}
    assert listed == {"checkpoints/ckpt/meta.json", "checkpoints/ckpt/shards"}


def test_resume_same_run(uri, tmp_path):
    first = _tracker(uri, run_name="stage1", tags={"stage": "stage1"})
    first.log_params(CONFIG)
    first.log_params({"launch": {"attempt_1": True}})
    first.log_dataset("sim_l1", "ab" * 32, "sim:metaworld")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.finish("KILLED")  # the job is killed ...
    run_id = first.run_id

    with _tracker(uri, run_id=run_id, tags={"attempt": "2"}) as again:  # ... and resumed
        assert again.run_id == run_id and again.resumed
        assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
        again.log_params(CONFIG)  # same config: fine
        again.log_params({"resume": {"from_step": 1}})  # new keys: fine
        again.log_dataset("sim_l1", "ab" * 32, "sim:metaworld")  # the same input again: harmless
        with pytest.raises(ParamConflictError, match=r"stages\.stage1\.lr") as err:
            again.log_params({**CONFIG, "stages": {"stage1": {"lr": 2e-4}}})
        assert "'0.0001'" in str(err.value) and "'0.0002'" in str(err.value)
        again.log_metrics({"train/loss": 0.5}, step=1)

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "stage1"
    assert run.data.tags["stage"] == "stage1" and run.data.tags["attempt"] == "2"
    assert run.data.params["stages.stage1.lr"] == "0.0001"
    assert run.data.params["resume.from_step"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["sim_l1"]
    saved = json.loads((_artifacts_dir(tmp_path, run_id) / PARAMS_ARTIFACT).read_text())
    assert saved == {**CONFIG, "launch": {"attempt_1": True}, "resume": {"from_step": 1}}  # both attempts


def test_resume_errors(uri):
    with _tracker(uri) as t:
        pass
    with pytest.raises(ValueError, match="not found"):
        _tracker(uri, run_id="0" * 32)
    with pytest.raises(ValueError, match="belongs to experiment 'motus-test'"):
        MlflowTracker(uri, "another", run_id=t.run_id, system_metrics=False)


def test_finish_statuses(uri):
    client = MlflowClient(uri)
    with _tracker(uri) as ok:
        pass
    assert client.get_run(ok.run_id).info.status == "FINISHED"

    with pytest.raises(RuntimeError, match="boom"):
        with _tracker(uri) as failed:
            raise RuntimeError("boom")
    assert client.get_run(failed.run_id).info.status == "FAILED"

    killed = _tracker(uri)
    killed.finish("KILLED")
    killed.finish("FINISHED")  # idempotent: the first status stays
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert client.get_run(killed.run_id).info.end_time is not None
    with pytest.raises(RuntimeError, match="already finished"):
        killed.log_metrics({"x": 1.0}, step=0)

    with _tracker(uri) as t, pytest.raises(ValueError, match="status"):
        t.finish("DONE")  # type: ignore[arg-type]


def test_system_metrics_sampled_and_stopped(uri):
    t = MlflowTracker(uri, "motus-test", system_metrics=True, system_metrics_interval=1.0)
    time.sleep(2.2)
    t.finish()
    metrics = MlflowClient(uri).get_run(t.run_id).data.metrics
    assert any(k.startswith("system/cpu") for k in metrics), sorted(metrics)
    assert not [th for th in threading.enumerate() if th.name == "SystemMetricsMonitor" and th.is_alive()]


def test_two_trackers_do_not_interfere(tmp_path, template_db):
    global_uri = mlflow.get_tracking_uri()
    uri_a, uri_b = _store_copy(template_db, tmp_path / "a"), _store_copy(template_db, tmp_path / "b")
    a = MlflowTracker(uri_a, "exp-a", system_metrics=False)
    b = MlflowTracker(uri_b, "exp-b", system_metrics=False)
    a.log_params({"who": "a"})
    b.log_params({"who": "b"})
    a.log_metrics({"m": 1.0}, step=0)
    b.log_metrics({"m": 2.0}, step=0)
    a.finish()
    b.finish("FAILED")
    assert mlflow.get_tracking_uri() == global_uri and mlflow.active_run() is None
    client_a, client_b = MlflowClient(uri_a), MlflowClient(uri_b)
    assert client_a.get_run(a.run_id).data.params == {"who": "a"}
    assert client_b.get_run(b.run_id).data.metrics == {"m": 2.0}
    assert client_b.get_run(b.run_id).info.status == "FAILED"
    assert client_a.get_experiment_by_name("exp-b") is None
    assert client_b.get_experiment_by_name("exp-a") is None
    assert (tmp_path / "a" / "mlartifacts" / a.run_id / "artifacts" / PARAMS_ARTIFACT).exists()
    assert (tmp_path / "b" / "mlartifacts" / b.run_id / "artifacts" / PARAMS_ARTIFACT).exists()


def test_relative_sqlite_uri_lands_in_cwd_not_mlruns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh database here: its folder is created, its schema migrated
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    with MlflowTracker("sqlite:///runs/mlflow.db", "motus", system_metrics=False) as t:
        t.log_params({"a": 1})
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    assert (tmp_path / "runs" / "mlartifacts" / t.run_id / "artifacts" / PARAMS_ARTIFACT).is_file()
    assert not (tmp_path / "mlruns").exists()


# ------------------------------------------------------------------------------------------ accounting


def test_device_hours_and_cost():
    assert device_hours(2, 8, 3600) == pytest.approx(16.0)
    assert device_hours(1, 1, 90) == pytest.approx(0.025)
    with pytest.raises(ValueError):
        device_hours(1, -1, 10)
    prices = {"h100": 2.5, "a100": 1.5}
    assert cost(16.0, "h100", prices) == pytest.approx(40.0)
    assert cost(2.0, "A100", prices) == pytest.approx(3.0)
    with pytest.warns(UserWarning, match="no price for device 'b200'"):
        assert cost(16.0, "b200", prices) is None


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_state(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never see a repository above tmp_path
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_state(outside) == {"commit": "unknown", "dirty": False, "branch": None}
    assert git_state(tmp_path / "missing")["commit"] == "unknown"

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    assert git_state(repo) == {"commit": "unknown", "dirty": False, "branch": "main"}  # no commit yet
    (repo / "train.py").write_text("print(1)\n")
    _git(repo, "add", "train.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    state = git_state(repo)
    assert state == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False, "branch": "main"}
    assert len(state["commit"]) == 40

    (repo / "train.py").write_text("print(2)\n")
    assert git_state(repo)["dirty"] is True
    _git(repo, "checkout", "-q", "--", "train.py")
    (repo / "new.py").write_text("")  # an untracked file is a dirty tree too
    assert git_state(repo)["dirty"] is True
    (repo / "new.py").unlink()
    # what a pipeline run writes (DVC's lock, tiers, outputs) is data, not code: still clean
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "data" / "tiers").mkdir(parents=True)
    (repo / "data" / "tiers" / "x.dvc").write_text("")
    (repo / "outputs").mkdir()
    (repo / "outputs" / "run.json").write_text("{}")
    assert git_state(repo)["dirty"] is False
    _git(repo, "checkout", "-q", "--detach")
    assert git_state(repo) == {"commit": state["commit"], "dirty": False, "branch": None}


def test_lineage_tree_fits_80_columns_and_writes_a_shared_parent_once():
    from motus.track.lineage import tree_lines

    def node(model, version, stage, tiers=(), parents=()):
        return {"model": model, "version": version, "stage": stage, "run_id": "r" * 32, "checkpoint_hash": "c" * 64,
                "config_hash": "f" * 64, "code_commit": "1" * 40, "code_dirty": "false", "features": {},
                "tiers": [{"name": n, "level": lvl, "content_hash": h * 64, "dvc_hash": None} for n, lvl, h in tiers],
                "device_hours": 0.25, "parents": list(parents)}

    graph = {"root": "m3/1", "versions": [
        node("m3/1".split("/")[0], 1, "stage3", [("a-very-long-tier-name-that-keeps-going-and-going", 6, "a")]),
        node("m2", 1, "stage2", [("t2", 4, "b")]), node("lam", 1, "latent-action"),
        node("m1", 1, "stage1", [("t1", 2, "d")])],
        "edges": [{"from": "m3/1", "to": "m2/1", "role": "init-from"},
                  {"from": "m2/1", "to": "m1/1", "role": "init-from"},
                  {"from": "m2/1", "to": "lam/1", "role": "latent-actions"},
                  {"from": "m3/1", "to": "lam/1", "role": "latent-actions"},
                  {"from": "m1/1", "to": "export:0123456789abcdef", "role": "init-from"}],
        "totals": {"device_hours": 1.0, "cost": None, "currency": "USD", "versions": 4}}
    lines = tree_lines(graph, width=80)
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= 80, text
    assert lines[0].startswith("m3 v1  (stage3")
    assert "tier t2 L4 " + "b" * 12 in text and "tier t1 L2 " + "d" * 12 in text
    assert text.count("lam v1") == 2 and "(as above)" in text  # the shared parent: written once, then referred to
    assert "init-from: unregistered export 0123456789ab" in text
    assert lines[-1].startswith("total: 1 device hours, cost unknown, 4 versions")
    assert "from the pretrained bases" in text


def test_lineage_picture_is_left_to_right_without_overlaps(tmp_path):
    from motus.track.lineage import _draw, layout, plot

    def node(model, stage, tiers, features=None):
        return {"model": model, "version": 1, "stage": stage, "device_hours": 0.5, "features": features or {},
                "tiers": [{"name": n, "level": lvl, "content_hash": h * 64} for n, lvl, h in tiers]}

    graph = {"root": "s3/1", "versions": [
        node("s3", "stage3", [("target-aloha-transfer", 6, "a"), ("target-aloha-insertion", 6, "b")]),
        node("s2", "stage2", [("task-agnostic-aloha", 4, "c"), ("target-aloha-transfer", 6, "a")],
             {"latent_actions/task-agnostic-aloha": "e" * 64}),
        node("s1", "stage1", [("web-video", 2, "d")]), node("lam", "latent-action", [("task-agnostic-aloha", 4, "c")],
                                                            {"flow/task-agnostic-aloha": "f" * 64})],
        "edges": [{"from": "s3/1", "to": "s2/1", "role": "init-from"}, {"from": "s2/1", "to": "s1/1", "role": "init-from"},
                  {"from": "s2/1", "to": "lam/1", "role": "latent-actions"}],
        "totals": {"device_hours": 2.0, "cost": 7.0, "currency": "USD", "versions": 4}}
    where, labels, edges = layout(graph)
    assert len(set(where.values())) == len(where)  # one cell per box
    tiers = [k for k in where if k.startswith("tier:")]
    assert len(tiers) == 4 and all(where[k][0] == 0 for k in tiers)  # a tier read twice is one box
    assert {where[k][0] for k in where if k.startswith("feature:")} == {1}
    assert where["s1/1"][0] < where["s2/1"][0] < where["s3/1"][0] and where["lam/1"][0] < where["s2/1"][0]
    assert all(where[a][0] < where[b][0] for a, b, _ in edges)  # every arrow points right
    fig, boxes = _draw(graph)
    fig.canvas.draw()  # the rounded boxes get their size when drawn
    extents = {k: t.get_bbox_patch().get_window_extent() for k, t in boxes.items()}
    keys = sorted(extents)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not extents[a].overlaps(extents[b]), (a, b)
    assert plot(graph, tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_a_tracking_store_that_does_not_answer_is_a_named_error_within_seconds(tmp_path):
    """No minutes of silent retries and no traceback: one line naming the store (its password masked), exit 1."""
    import sys

    from motus.launch.local import free_port
    from motus.track.tracker import TrackingUnreachable, check_reachable

    down = f"http://svc:pw-planted-1@127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachable, match=r"the tracking store http://svc:\*\*\*@127\.0\.0\.1:\d+ does not "
                                                  r"answer \(.*refused"):
        check_reachable(down)
    with pytest.raises(TrackingUnreachable, match="postgresql://u:\\*\\*\\*@127.0.0.1"):
        check_reachable(f"postgresql://u:pw-planted-2@127.0.0.1:{free_port()}/mlflow")
    check_reachable("sqlite:///nowhere/mlflow.db")  # a file: nothing to probe
    assert time.monotonic() - t0 < 10  # refused connections answer at once; a silent host waits 5 s at most
    t0 = time.monotonic()
    repo = Path(__file__).resolve().parents[2]
    motus = Path(sys.executable).parent / "motus"
    r = subprocess.run([str(motus), "registry", "list", "-p", str(repo / "params.yaml")], cwd=tmp_path,
                       env={**os.environ, "MOTUS_TRACKING_URI": down}, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30  # the command's own start-up (imports) on a loaded machine, plus the probe
    assert r.returncode == 1 and r.stderr.startswith("error: the tracking store http://svc:***@127.0.0.1:")
    assert "pw-planted" not in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
