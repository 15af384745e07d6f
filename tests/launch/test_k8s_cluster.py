"""PyTorchJobs that run: the stand-in cluster (tests/support/k8s_standin.py) plays the Training Operator and the
kubelet, so a job the `kubernetes` launcher submits really starts its pods as processes, with the operator's
environment, its ConfigMap and its workspace volume. These tests prove that a 2-node job's pods find each other
(torchrun from PET_*, gloo) and train to an export, that the API reports the job's life the way the SDK reads
it, and that Kueue's hold, a permanent failure and an eviction end as the operator would end them."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from motus.config import get_settings
from motus.contracts import JobSpec, LineageRecord
from motus.launch import kubernetes as k8s
from motus.launch.launcher import FAILED, SUCCEEDED

from ..support.k8s_standin import Image, KubeApiStandIn
from ..support.project import MINIMAL_TIERS, REPO, small_params, write_project

IMAGE = "registry.example/motus-train:test"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """One ALOHA tier, 2-step stages, and a CPU pool (no GPUs: one process per node) queued in Kueue."""
    raw = small_params(2, MINIMAL_TIERS)
    raw["pools"]["cpu"] = {"gpu": "cpu", "gpus_per_node": 0, "queue": "motus-cpu"}
    return write_project(tmp_path_factory.mktemp("k8s") / "workspace", raw, ingest=["task-agnostic-aloha"])


@pytest.fixture
def cluster(project, tmp_path):
    # the image's ENV: this interpreter, CPU DeepSpeed with the suite's built comm op, nothing of the test's own
    image = Image(python=sys.executable, env={
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), "MLFLOW_DISABLE_TELEMETRY": "true"})
    with KubeApiStandIn(run_pods=True, volumes={"motus-workspace": project}, images={IMAGE: image},
                        grace_s=3.0) as api:
        api.kubeconfig(tmp_path / "kubeconfig")
        api.add_secret("motus", "motus-s3", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
        yield api


def launcher(cluster, tmp_path, monkeypatch) -> k8s.KubernetesLauncher:
    monkeypatch.setenv("MOTUS_POOL", "cpu")
    monkeypatch.setenv("MOTUS_IMAGE", IMAGE)
    settings = get_settings()
    client = k8s.ClusterClient(tmp_path / "kubeconfig", namespace="motus")
    return k8s.KubernetesLauncher(client, settings, k8s.ClusterOptions.from_settings(settings), poll_s=0.3)


def spec(project: Path, run: str, **kw) -> JobSpec:
    # the run folder is relative: it lives on the workspace volume, where the pods' working directory is
    return JobSpec(stage="stage1", run_dir=Path("runs") / run, params_file=project / "params.yaml", nodes=2,
                   track=False, **kw)


def _cli(*args: str):
    from typer.testing import CliRunner

    from motus.cli import app

    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def test_a_two_node_job_runs_its_pods_and_trains_to_an_export(cluster, project, tmp_path, monkeypatch):
    import threading
    import time

    launch = launcher(cluster, tmp_path, monkeypatch)
    handle = launch.submit(spec(project, "two-nodes"))
    # `motus k8s logs --follow` from the moment the Master runs: it streams until the Master's container ends
    master, followed = f"{handle.name}-master-0", {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (cluster.pods.get(("motus", master)) or {}).get(
            "status", {}).get("phase") != "Running":
        time.sleep(0.1)
    follower = threading.Thread(target=lambda: followed.update(r=_cli(
        "k8s", "logs", handle.name, "--follow", "--kubeconfig", str(tmp_path / "kubeconfig"))), daemon=True)
    follower.start()
    outcome = launch.wait(handle, timeout_s=600)
    follower.join(60)
    logs = launch.logs(handle)
    assert outcome.state == SUCCEEDED, f"{outcome}\n{logs[-4000:]}"

    job = launch.client.get(handle.name)
    assert k8s.job_state(job) == "Succeeded"
    types = [c["type"] for c in job["status"]["conditions"]]
    assert types[:2] == ["Created", "Suspended"] and "Running" in types  # queued in Kueue, then admitted
    pods = {p["metadata"]["name"]: p for p in cluster.pods.values()}
    assert set(pods) == {f"{handle.name}-master-0", f"{handle.name}-worker-0"}
    # both nodes trained: one world of two processes (torchrun from the operator's PET_* variables)
    run = project / "runs" / "two-nodes"
    manifests = sorted((run / "checkpoints").glob("*/manifest.json"))
    assert manifests and json.loads(manifests[-1].read_text())["world_size"] == 2
    lineage = LineageRecord.read(run / "export")
    assert lineage.stage == "stage1" and lineage.device_hours > 0
    assert "[" + f"{handle.name}-master-0] " in logs
    # device-hours from the job's own start and completion times: 2 nodes x 0 GPUs on a CPU pool
    assert k8s.job_gpu_hours(job) == 0.0
    assert job["status"]["startTime"] <= job["status"]["completionTime"]
    # the follower saw the training as it happened, to its last line, and ended with the container
    assert not follower.is_alive() and followed["r"].exit_code == 0, followed
    streamed = [ln for ln in followed["r"].output.splitlines() if ln.startswith(f"[Pod {master}]: ")]
    master_log = launch.client.logs(handle.name)[master].rstrip().splitlines()
    assert streamed, followed["r"].output[-3000:]
    assert streamed[-1].split("]: ", 1)[1] == master_log[-1], (streamed[-3:], master_log[-3:])
    # `motus k8s status` reads the job's phase and, from the run folder on the volume, its goodput
    status = _cli("k8s", "status", handle.name, "--workspace", str(project), "--kubeconfig", str(tmp_path / "kubeconfig"))
    assert status.exit_code == 0, status.output
    line = status.output.splitlines()[0]
    assert line.startswith(f"{handle.name}: succeeded  nodes=2") and "restarts=0" in line, line
    good = float(re.search(r"goodput=(\d+)%", line).group(1))
    assert 0 < good < 100  # start-up, checkpoints and validation are device time that trained nothing


def test_a_held_queue_then_a_failing_worker_fail_the_job_once(cluster, project, tmp_path, monkeypatch):
    launch = launcher(cluster, tmp_path, monkeypatch)
    # Kueue holds the queue: the job stays suspended and starts no pod until admitted
    cluster.hold("motus-cpu")
    handle = launch.submit(spec(project, "fails", init_from=str(project / "no-such-export")))
    assert cluster.state("motus", handle.name) == "Suspended" and cluster.pods == {}
    cluster.release("motus-cpu")
    # a worker that raises exits 1: a permanent failure under restartPolicy ExitCode, never restarted
    outcome = launch.wait(handle, timeout_s=300)
    assert outcome.state == FAILED and "replica(s) failed" in outcome.message, outcome
    assert "no-such-export" in launch.logs(handle)
    restarts = [p["status"]["containerStatuses"][0]["restartCount"] for p in cluster.pods.values()]
    assert set(restarts) == {0}
    # a retry of the same job (same name: the config hash) replaces the finished attempt instead of a 409
    uid = launch.client.get(handle.name)["metadata"]["uid"]
    again = launch.submit(spec(project, "fails", init_from=str(project / "no-such-export")))
    assert again.name == handle.name and launch.client.get(again.name)["metadata"]["uid"] != uid
    assert launch.wait(again, timeout_s=300).state == FAILED


def test_an_evicted_master_restarts_and_the_job_resumes(cluster, project, tmp_path, monkeypatch):
    import time

    import yaml

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["stages"]["stage1"].update(steps=30, checkpoint_every=2, validate_every=30)
    (project / "params-long.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    launch = launcher(cluster, tmp_path, monkeypatch)
    handle = launch.submit(spec(project, "evicted").with_updates(params_file=project / "params-long.yaml"))
    run = project / "runs" / "evicted"
    deadline = time.monotonic() + 300
    while not list((run / "checkpoints").glob("step-*/manifest.json")):  # committed, not a .tmp- one
        assert time.monotonic() < deadline and cluster.state("motus", handle.name) != "Failed"
        time.sleep(0.2)
    cluster.evict("motus", f"{handle.name}-master-0")
    outcome = launch.wait(handle, timeout_s=600)
    logs = launch.logs(handle)
    assert outcome.state == SUCCEEDED, f"{outcome}\n{logs[-3000:]}"
    job = launch.client.get(handle.name)
    types = [c["type"] for c in job["status"]["conditions"]]
    assert "Restarting" in types and types[-1] == "Succeeded", types
    # the Master exited 143 (SIGTERM, retryable), the Worker PEER_LOST: both pods restarted, once
    restarts = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
                for p in cluster.pods.values()}
    assert restarts == {f"{handle.name}-master-0": 1, f"{handle.name}-worker-0": 1}, restarts
    # it resumed from its latest complete checkpoint: no step before it was trained twice
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    back = [b for a, b in zip(steps, steps[1:], strict=False) if b <= a]  # where the restarted run picked up
    assert steps[-1] == 30 and steps.count(1) == 1 and len(back) <= 1, steps
    assert not back or (back[0] - 1) % 2 == 0, steps  # right after a checkpoint (every 2 steps)
    assert LineageRecord.read(run / "export").stage == "stage1"


def test_a_pod_that_cannot_pull_its_image_fails_the_job_instead_of_waiting_forever(cluster, project, tmp_path,
                                                                                    monkeypatch):
    import dataclasses

    launch = launcher(cluster, tmp_path, monkeypatch)
    launch.opts = dataclasses.replace(launch.opts, stuck_grace_s=1.0)
    handle = launch.submit(spec(project, "no-image", image="registry.example/motus-train:typo"))
    outcome = launch.wait(handle, timeout_s=120)
    assert outcome.state == FAILED, outcome
    assert re.search(r"pod motus-stage1-\w+-(master|worker)-0 cannot start: ErrImagePull: image "
                     r"'registry.example/motus-train:typo' is not on this cluster", outcome.message), outcome
    assert handle.name not in {j["metadata"]["name"] for j in launch.client.list()}  # deleted: frees its nodes
