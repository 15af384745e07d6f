"""The `kubernetes` launcher: rendered PyTorchJobs, offline validation, Kustomize, submission to an API stand-in,
and the object-store checkpoint mirror a restarted job resumes from."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from motus.cli import app
from motus.config import load_params
from motus.contracts import JobSpec
from motus.launch import k8s_validate as kv
from motus.launch import kubernetes as k8s
from motus.launch.local import command as local_command

from ..support.k8s_standin import KubeApiStandIn

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"
IMAGE = "registry.example/motus-train:test"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
runner = CliRunner()


@pytest.fixture(scope="module")
def params():
    return load_params(PARAMS)


def _spec(stage: str, pool: str, nodes: int, params, **kw) -> JobSpec:
    return JobSpec(stage=stage, run_dir=Path("outputs/runs") / stage, params_file=PARAMS, nodes=nodes,
                   procs_per_node=params.pools[pool].gpus_per_node, pool=pool, image=IMAGE, **kw)


def _render(spec, params, **opts) -> dict:
    return k8s.to_manifest(k8s.build_pytorchjob(spec, params, k8s.ClusterOptions(**opts)))


def _cli(*args: str, env: dict | None = None):
    result = runner.invoke(app, list(args), env={"MOTUS_PARAMS": str(PARAMS), **(env or {})})
    assert "Traceback" not in result.output
    return result


# ------------------------------------------------------------------------------------------------ render


@pytest.mark.parametrize("pool", ["a100", "h100"])
@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_rendered_job_for_every_pool_and_stage_validates(params, stage, pool):
    spec = _spec(stage, pool, 4, params, init_from=None if stage == "stage1" else "outputs/runs/parent/export")
    job = _render(spec, params, data_remote="s3://motus-data/dvc")
    assert kv.validate_pytorchjob(job) == []

    cfg = params.pools[pool]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    assert job["spec"]["nprocPerNode"] == str(cfg.gpus_per_node)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == cfg.queue
    assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 4
    for rspec in replicas.values():
        pod = rspec["template"]["spec"]
        assert pod["nodeSelector"] == cfg.node_selector
        assert pod["tolerations"] == cfg.tolerations
        main = next(c for c in pod["containers"] if c["name"] == "pytorch")
        assert main["resources"]["limits"]["nvidia.com/gpu"] == str(cfg.gpus_per_node)
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        # the local launcher's worker command, unchanged but for the params file's in-pod path
        local = local_command(spec)
        local_spec = JobSpec.from_json(json.loads(local[local.index("--spec") + 1]))
        head, pod_spec = main["command"][:-1], JobSpec.from_json(json.loads(main["command"][-1]))
        assert head == ["python", "-m", "motus.launch.node", "-m", "motus.launch.worker", "--spec"]
        assert pod_spec == local_spec.with_updates(params_file=Path(k8s.PARAMS_PATH)) == dataclasses.replace(
            spec.for_worker(), params_file=Path(k8s.PARAMS_PATH))
        # credentials only by reference
        for c in pod["containers"] + pod.get("initContainers", []):
            for e in c["env"]:
                if re.search(r"SECRET|PASSWORD|ACCESS_KEY", e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
    # the Master restores from and mirrors to the object store; Workers do not
    master_init = [c["name"] for c in replicas["Master"]["template"]["spec"]["initContainers"]]
    assert master_init == ["restore", "mirror"]
    assert "initContainers" not in replicas["Worker"]["template"]["spec"]


def test_inline_credentials_and_bad_choices_are_refused(params):
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY: credentials must come from a Kubernetes Secret"):
        _render(_spec("stage1", "h100", 2, params, env={"AWS_SECRET_ACCESS_KEY": "hunter2"}), params)
    # the tracking URI's user and password never reach the job's spec: the pods take the MLflow Secret's
    job = _render(_spec("stage1", "h100", 2, params), params, tracking_uri="http://svc:pw-planted-9@mlflow:5000")
    env = {e["name"]: e for e in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MOTUS_TRACKING_URI"]["value"] == "http://mlflow:5000" and "pw-planted-9" not in json.dumps(job)
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "motus-mlflow"
    job = _render(_spec("stage1", "h100", 2, params, env={"MOTUS_TRACKING_URI": "http://svc:pw-planted-9@mlflow:5000"}),
                  params)
    assert "pw-planted-9" not in json.dumps(job)  # the pipeline's own URI, handed over in the spec's env
    with pytest.raises(ValueError, match="job env MOTUS_DB: a URI with a password must not be written inline"):
        _render(_spec("stage1", "h100", 2, params, env={"MOTUS_DB": "postgresql://u:pw@db/x"}), params)
    with pytest.raises(ValueError, match="tracking URI carries a password, and no MLflow Secret"):
        _render(_spec("stage1", "h100", 2, params), params, tracking_uri="http://svc:pw@mlflow:5000", mlflow_secret=None)
    with pytest.raises(ValueError, match=r"pools\.v100: unknown pool"):
        _render(JobSpec(stage="stage1", run_dir=Path("r"), params_file=PARAMS, pool="v100", image=IMAGE), params)
    with pytest.raises(ValueError, match="exceeds pools.h100.gpus_per_node 8"):
        _render(JobSpec(stage="stage1", run_dir=Path("r"), params_file=PARAMS, nodes=2, procs_per_node=16,
                        pool="h100", image=IMAGE), params)


def test_gpu_hours_are_nodes_times_gpus_times_wall_hours(params):
    job = _render(_spec("stage1", "h100", 4, params), params)
    assert k8s.job_gpu_hours(job) is None  # not started
    job["status"] = {"startTime": "2025-01-01T00:00:00Z", "completionTime": "2025-01-01T01:30:00Z"}
    assert k8s.job_gpu_hours(job) == pytest.approx(4 * 8 * 1.5)


# -------------------------------------------------------------------------------------------- validation


def test_broken_manifests_are_caught_with_the_field_named(params):
    good = _render(_spec("stage1", "h100", 2, params), params)
    assert kv.validate_pytorchjob(good) == []

    def broken(edit):
        job = json.loads(json.dumps(good))
        edit(job)
        return "\n".join(kv.validate_pytorchjob(job))

    master = ("spec", "pytorchReplicaSpecs", "Master")

    def at(job, *path):
        for p in path:
            job = job[p]
        return job

    typo = broken(lambda j: at(j, *master, "template", "spec", "containers", 0).update(imagePullPolicyy="Always"))
    assert "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].imagePullPolicyy: unknown field" in typo
    assert "did you mean 'imagePullPolicy'" in typo
    run_policy = broken(lambda j: j["spec"]["runPolicy"].update(backofLimit=3))
    assert "spec.runPolicy.backofLimit: unknown field" in run_policy
    wrong_type = broken(lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two"))
    assert "spec.pytorchReplicaSpecs.Worker.replicas: 'two' is not of type 'integer'" in wrong_type
    two_masters = broken(lambda j: at(j, *master).update(replicas=2))
    assert "spec.pytorchReplicaSpecs.Master.replicas: must be 1" in two_masters
    renamed = broken(lambda j: at(j, *master, "template", "spec", "containers", 0).update(name="trainer"))
    assert "spec.pytorchReplicaSpecs.Master.template.spec.containers: needs a container named 'pytorch'" in renamed
    chief = broken(lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Worker"]))
    assert "spec.pytorchReplicaSpecs.Chief: replica type must be Master or Worker" in chief
    no_workers = broken(lambda j: (j["spec"]["pytorchReplicaSpecs"].pop("Worker"),
                                   j["spec"].update(elasticPolicy={"minReplicas": 1, "maxReplicas": 4})))
    assert "spec.elasticPolicy: needs Worker replicas" in no_workers
    # free-form maps stay free-form: labels and resource names are not "unknown fields"
    ok = broken(lambda j: (j["metadata"]["labels"].update({"team": "robots"}),
                           at(j, *master, "template", "spec", "containers", 0, "resources", "limits")
                           .update({"example.com/fpga": "1"})))
    assert ok == ""


def test_crd_strictening_follows_structural_pruning():
    schema = kv._forbid_unknown({"type": "object", "properties": {
        "metadata": {"type": "object"},
        "limits": {"type": "object", "additionalProperties": {"type": "string"}},
        "raw": {"type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True},
        "spec": {"type": "object", "properties": {"x": {"type": "integer"}}}}})
    assert schema["additionalProperties"] is False
    assert schema["properties"]["spec"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["metadata"]
    assert schema["properties"]["limits"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in schema["properties"]["raw"]


def test_core_objects_are_validated_strictly(params):
    cm = k8s.params_configmap(PARAMS, params, "motus")
    (verdict,) = kv.validate_documents([cm])
    assert verdict.ok and "strict" in verdict.checked_with
    cm["metadata"]["lables"] = {"a": "b"}
    (verdict,) = kv.validate_documents([cm])
    assert verdict.problems == ["metadata.lables: unknown field"]
    pvc = yaml.safe_load((REPO / "k8s/base/workspace-pvc.yaml").read_text())
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string where a list belongs
    (verdict,) = kv.validate_documents([pvc])
    assert verdict.problems and verdict.problems[0].startswith("spec.accessModes:")


# ---------------------------------------------------------------------------------------------- kustomize


def _kustomize(folder: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / folder)], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@needs_kubectl
@pytest.mark.parametrize("pool", ["a100", "h100"])
def test_overlays_render_validate_and_match_the_pool(params, pool):
    docs = _kustomize(f"k8s/overlays/{pool}")
    verdicts = kv.validate_documents(docs)
    assert [v.problems for v in verdicts if not v.ok] == []
    assert {v.kind for v in verdicts} == {"Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim",
                                          "PyTorchJob"}
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    cfg = params.pools[pool]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == cfg.queue
    python = _render(_spec("stage1", pool, 2, params), params)
    for rtype in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]
        assert pod["nodeSelector"] == cfg.node_selector and pod["tolerations"] == cfg.tolerations
        main = pod["containers"][0]
        assert main["command"] == python["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"][0]["command"]
        assert main["resources"]["limits"]["nvidia.com/gpu"] == str(cfg.gpus_per_node)
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    assert configmap["metadata"]["name"] == "motus-params" and "params.yaml" in configmap["data"]


def test_kustomize_base_carries_the_current_params():
    copy = (REPO / "k8s/base/params.yaml").read_text()
    assert copy == PARAMS.read_text(), "k8s/base/params.yaml differs from params.yaml: run `motus k8s sync-params`"


@needs_kubectl
def test_kueue_queues_match_the_pools(params):
    docs = _kustomize("k8s/kueue")
    flavors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ResourceFlavor"}
    local = {d["metadata"]["name"]: d for d in docs if d["kind"] == "LocalQueue"}
    cluster = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterQueue"}
    for name, pool in params.pools.items():
        assert flavors[name]["spec"]["nodeLabels"] == pool.node_selector
        cq = cluster[local[pool.queue]["spec"]["clusterQueue"]]
        (group,) = cq["spec"]["resourceGroups"]
        gpu = {f["name"]: {r["name"]: r["nominalQuota"] for r in f["resources"]} for f in group["flavors"]}
        assert gpu[name]["nvidia.com/gpu"] >= pool.gpus_per_node
    assert all(v.ok for v in kv.validate_documents(docs))  # core objects pass; Kueue kinds are reported skipped


# ------------------------------------------------------------------------------------- the API stand-in


@pytest.fixture
def standin(tmp_path):
    with KubeApiStandIn() as api:
        api.kubeconfig(tmp_path / "kubeconfig")
        api.add_secret("motus", "motus-s3", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
        yield api


def test_impossible_jobs_are_refused_before_anything_is_submitted(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # k8s/kueue: the queues' quotas
    with KubeApiStandIn() as api:  # no Secret yet
        kubeconfig = str(api.kubeconfig(tmp_path / "kubeconfig"))
        args = ["k8s", "submit", "--stage", "1", "--pool", "h100", "--image", IMAGE, "--kubeconfig", kubeconfig]
        r = _cli(*args, "--nodes", "2")
        assert r.exit_code == 1 and "Secret motus/motus-s3 does not exist" in r.output, r.output
        api.add_secret("motus", "motus-s3", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
        r = _cli(*args, "--nodes", "9")  # 9 x 8 GPUs > the 64 of ClusterQueue motus-h100
        assert r.exit_code == 1 and "exceeds the quota of queue motus-h100" in r.output, r.output
        assert "use at most 8 nodes" in r.output
        assert api.recorded("POST", r"pytorchjobs|configmaps") == []


def test_submit_status_logs_cancel_through_the_stand_in(standin, tmp_path):
    kubeconfig = str(tmp_path / "kubeconfig")
    args = ["--stage", "1", "--pool", "h100", "--nodes", "2", "--image", IMAGE, "--name", "motus-s1-test"]
    rendered = _cli("k8s", "render", *args)
    assert rendered.exit_code == 0, rendered.output
    cm, job = list(yaml.safe_load_all(rendered.stdout))

    result = _cli("k8s", "submit", *args, "--kubeconfig", kubeconfig)
    assert result.exit_code == 0, result.output
    assert "submitted PyTorchJob motus/motus-s1-test" in result.output and "queue motus-h100" in result.output
    (post,) = standin.recorded("POST", r"/apis/kubeflow\.org/v1/namespaces/motus/pytorchjobs$")
    assert post.body == job  # what reached the API server is exactly what `render` printed
    (cm_post,) = standin.recorded("POST", r"/api/v1/namespaces/motus/configmaps$")
    assert cm_post.body == cm and cm["data"]["params.yaml"] == PARAMS.read_text()

    again = _cli("k8s", "submit", *args, "--kubeconfig", kubeconfig)
    assert again.exit_code == 1 and "motus-s1-test already exists" in again.output

    start = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    standin.set_condition("motus", "motus-s1-test", "Running", start=start)
    status = _cli("k8s", "status", "motus-s1-test", "--kubeconfig", kubeconfig)
    assert status.exit_code == 0, status.output
    hours = float(re.search(r"gpu_hours=([\d.]+)", status.output).group(1))
    assert "Running" in status.output and hours == pytest.approx(2 * 8 * 2.0, abs=0.05)
    money = float(re.search(r"cost=([\d.]+)", status.output).group(1))
    assert money == pytest.approx(hours * 3.50, abs=0.01)  # params.yaml costs.device_hour.H100

    standin.pod_logs["motus-s1-test-master-0"] = "step 1 loss 0.9\nstep 2 loss 0.8\n"
    logs = _cli("k8s", "logs", "motus-s1-test", "--kubeconfig", kubeconfig)
    assert logs.exit_code == 0 and "[motus-s1-test-master-0] step 2 loss 0.8" in logs.output

    cancel = _cli("k8s", "cancel", "motus-s1-test", "--kubeconfig", kubeconfig)
    assert cancel.exit_code == 0, cancel.output
    assert standin.recorded("DELETE", r"/pytorchjobs/motus-s1-test$")
    gone = _cli("k8s", "status", "motus-s1-test", "--kubeconfig", kubeconfig)
    assert gone.exit_code == 1 and "not found" in gone.output


def test_dry_run_prints_yaml_and_submits_nothing(standin, tmp_path):
    result = _cli("k8s", "submit", "--stage", "stage2", "--pool", "a100", "--nodes", "3", "--image", IMAGE,
                  "--elastic-min", "2", "--elastic-max", "4", "--dry-run", "--kubeconfig", str(tmp_path / "kubeconfig"))
    assert result.exit_code == 0, result.output
    job = list(yaml.safe_load_all(result.stdout))[1]
    assert job["spec"]["elasticPolicy"] == {"maxReplicas": 4, "maxRestarts": 3, "minReplicas": 2, "rdzvBackend": "c10d"}
    assert standin.requests == []
    lonely = _cli("k8s", "submit", "--stage", "stage2", "--pool", "a100", "--nodes", "1", "--image", IMAGE,
                  "--elastic-min", "1", "--elastic-max", "4", "--dry-run")
    assert lonely.exit_code == 1 and "spec.elasticPolicy: needs Worker replicas" in lonely.output


def test_no_cluster_is_said_plainly(tmp_path):
    missing = _cli("k8s", "submit", "--stage", "1", "--image", IMAGE, "--kubeconfig", str(tmp_path / "nope"))
    assert missing.exit_code == 1 and "error: no kubeconfig" in missing.output
    dead = KubeApiStandIn().start()
    dead.kubeconfig(tmp_path / "kubeconfig")
    url = dead.url
    dead.stop()  # the port is now closed: an unreachable API server
    result = _cli("k8s", "submit", "--stage", "1", "--image", IMAGE, env={"KUBECONFIG": str(tmp_path / "kubeconfig")})
    assert result.exit_code == 1 and "is unreachable" in result.output and url in result.output
    # to a pipeline an unreachable API is infrastructure (the step is retried); a refusal is not
    from motus.pipeline.errors import is_infrastructure_error

    with pytest.raises(k8s.ClusterError) as unreachable:
        k8s.ClusterClient(tmp_path / "kubeconfig").get("motus-stage1-x")
    assert is_infrastructure_error(unreachable.value)
    with KubeApiStandIn() as live:
        live.kubeconfig(tmp_path / "live")
        with pytest.raises(k8s.ClusterError, match="not found") as refused:
            k8s.ClusterClient(tmp_path / "live").get("motus-stage1-x")
    assert not is_infrastructure_error(refused.value)


def test_no_cluster_from_a_real_process_has_no_traceback(tmp_path):
    env = {**os.environ, "MOTUS_PARAMS": str(PARAMS), "KUBECONFIG": str(tmp_path / "absent"),
           "HOME": str(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.run([str(Path(sys.executable).parent / "motus"), "k8s", "cancel", "motus-x"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no kubeconfig") and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------- object-store checkpoints


def _fake_checkpoint(ckpts: Path, step: int) -> Path:
    """A checkpoint folder as save_checkpoint lays it out (files + manifest), without a DeepSpeed engine."""
    from motus.train.checkpoint import CheckpointManifest, step_dir_name

    d = ckpts / step_dir_name(step)
    (d / "ds").mkdir(parents=True)
    files = {"ds/mp_rank_00_model_states.pt": os.urandom(1000 + step), "rng-rank0.pt": os.urandom(64)}
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    (d / "manifest.json").write_text(CheckpointManifest(
        stage="stage1", step=step, data_position=step * 4, lr_schedule=None, rng_files=["rng-rank0.pt"],
        config_hash="c", parent=None, world_size=1, zero_stage=2, wall_seconds=1.0, created_at="now",
        motus_version="0", files={k: {"bytes": len(v), "sha256": None} for k, v in files.items()},
        content_hash=None).to_json())
    (ckpts / "latest").write_text(d.name)
    return d


@pytest.fixture
def s3():
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    from motus.launch.checkpoint_store import s3_client

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    client = s3_client(f"http://{host}:{port}")
    client.create_bucket(Bucket="motus-data")
    yield client
    server.stop()


def test_restarted_job_resumes_from_the_latest_complete_checkpoint_in_the_store(s3, tmp_path):
    from motus.launch import checkpoint_store as store
    from motus.train.checkpoint import find_latest_complete

    remote = "s3://motus-data/runs/outputs/runs/stage1"
    run = tmp_path / "pvc-1" / "outputs/runs/stage1"
    for step in (10, 20):
        _fake_checkpoint(run / "checkpoints", step)
    assert store.push(run, remote, s3) == [10, 20]
    assert store.push(run, remote, s3) == []  # already mirrored
    # an upload cut off before its manifest, and one whose manifest lists a file that never arrived
    s3.put_object(Bucket="motus-data", Key="runs/outputs/runs/stage1/checkpoints/step-000030/rng-rank0.pt", Body=b"x")
    torn = json.loads((run / "checkpoints/step-000020/manifest.json").read_text()) | {"step": 40}
    s3.put_object(Bucket="motus-data", Key="runs/outputs/runs/stage1/checkpoints/step-000040/manifest.json",
                  Body=json.dumps(torn).encode())
    assert store.remote_complete_steps(s3, remote) == [10, 20]

    fresh = tmp_path / "pvc-2" / "outputs/runs/stage1"  # the job restarted on a new, empty volume
    assert store.pull_latest(fresh, remote, s3) == 20
    restored = find_latest_complete(fresh / "checkpoints")
    assert restored is not None and restored.name == "step-000020"
    for p in (run / "checkpoints/step-000020").rglob("*"):
        if p.is_file():
            assert (restored / p.relative_to(run / "checkpoints/step-000020")).read_bytes() == p.read_bytes()
    assert (fresh / "checkpoints/latest").read_text() == "step-000020"

    _fake_checkpoint(fresh / "checkpoints", 25)  # the volume is ahead of the store: leave it alone
    assert store.pull_latest(fresh, remote, s3) == 25
    assert find_latest_complete(fresh / "checkpoints").name == "step-000025"


@needs_kubectl
def test_infra_services_are_valid_kubernetes_objects():
    docs = _kustomize("infra/services")
    verdicts = kv.validate_documents(docs)
    assert [(v.kind, v.name, v.problems) for v in verdicts if not v.ok or v.skipped] == []
    assert {"Deployment/mlflow", "Deployment/minio", "StatefulSet/postgres", "Deployment/prefect-server",
            "Deployment/prefect-worker"} <= {f"{v.kind}/{v.name}" for v in verdicts}
    # no credential is written inline anywhere in the services
    for doc in docs:
        for env in re.findall(r"'name': '([A-Z_]+)', 'value': '", str(doc)):
            assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY", env), (doc["metadata"]["name"], env)


@pytest.mark.parametrize("ending", ["Succeeded", "Failed"])
def test_motus_train_submits_through_the_kubernetes_launcher(standin, tmp_path, ending):
    """MOTUS_LAUNCHER=kubernetes: `motus train` sends the PyTorchJob `motus k8s render` prints, then waits for it."""
    import threading

    rendered = _cli("k8s", "render", "--stage", "1", "--pool", "h100", "--image", IMAGE)
    assert rendered.exit_code == 0, rendered.output
    cm, job = list(yaml.safe_load_all(rendered.stdout))
    name = job["metadata"]["name"]

    def operator():  # the Training Operator's part: the job runs, then ends
        for _ in range(600):
            if standin.recorded("POST", r"/pytorchjobs$"):
                standin.set_condition("motus", name, "Running")
                standin.set_condition("motus", name, ending, completion=dt.datetime.now(dt.timezone.utc)
                                      .strftime("%Y-%m-%dT%H:%M:%SZ"))
                return
            threading.Event().wait(0.05)

    t = threading.Thread(target=operator, daemon=True)
    t.start()
    env = {"MOTUS_LAUNCHER": "kubernetes", "MOTUS_POOL": "h100", "MOTUS_IMAGE": IMAGE, "MOTUS_K8S_POLL_S": "0.2",
           "KUBECONFIG": str(tmp_path / "kubeconfig")}
    result = _cli("train", "--stage", "1", env=env)
    t.join(5)
    (post,) = standin.recorded("POST", r"/apis/kubeflow\.org/v1/namespaces/motus/pytorchjobs$")
    assert post.body == job  # the same PyTorchJob as `motus k8s render`
    (cm_post,) = standin.recorded("POST", r"/api/v1/namespaces/motus/configmaps$")
    assert cm_post.body == cm
    assert "submitting through the kubernetes launcher" in result.output
    if ending == "Succeeded":
        assert result.exit_code == 0, result.output
        assert "stage1: done" in result.output
    else:
        assert result.exit_code == 1 and "error: stage1 failed" in result.output


def test_the_launcher_factory_reads_motus_launcher(tmp_path, monkeypatch):
    from motus.config import get_settings
    from motus.launch.factory import launcher_for
    from motus.launch.launcher import Launcher
    from motus.launch.local import LocalLauncher

    monkeypatch.delenv("MOTUS_LAUNCHER", raising=False)
    local = launcher_for(get_settings(), log=tmp_path / "job.log")
    assert isinstance(local, LocalLauncher) and isinstance(local, Launcher) and local.kind == "local"
    monkeypatch.setenv("MOTUS_LAUNCHER", "kubernetes")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(k8s.ClusterError, match="no kubeconfig"):
        launcher_for(get_settings())
    with KubeApiStandIn() as api:
        api.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        remote = launcher_for(get_settings())
        assert isinstance(remote, k8s.KubernetesLauncher) and isinstance(remote, Launcher)
    spec = JobSpec(stage="stage1", run_dir=Path("r"), params_file=PARAMS)
    with pytest.raises(ValueError, match="needs a pool: set MOTUS_POOL"):
        k8s.cluster_spec(spec, load_params(PARAMS))
    assert JobSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_the_crd_ships_with_the_package():
    """Validation needs no checkout: the PyTorchJob CRD is package data, the same as the v1.9 reference."""
    import gzip

    assert kv.DEFAULT_PYTORCHJOB_CRD.parent == Path(kv.__file__).resolve().parent / "crds"
    schemas = kv.load_crd_schemas([kv.DEFAULT_PYTORCHJOB_CRD])
    assert ("kubeflow.org/v1", "PyTorchJob") in schemas
    reference = REPO.parent / "shared" / "reference" / "crds" / "kubeflow.org_pytorchjobs.v1.9.yaml"
    assert gzip.decompress(kv.DEFAULT_PYTORCHJOB_CRD.read_bytes()) == reference.read_bytes()


# ------------------------------------------------------------- a pipeline training step on the API stand-in


@dataclasses.dataclass
class _StepContext:
    """The part of the pipeline executor a training step's job uses (`run_job`): where, which params, how to talk."""

    root: Path
    settings: object
    params_file: Path = PARAMS
    nproc: int = 1
    tracking_uri: str = "http://mlflow.invalid:5000"
    lines: list = dataclasses.field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return self.root / "outputs"

    def echo(self, line: str) -> None:
        self.lines.append(line)


def _step_context(standin, tmp_path, monkeypatch) -> _StepContext:
    from motus.config import Settings

    monkeypatch.chdir(REPO)  # k8s/kueue: the queues' quotas
    for k, v in {"MOTUS_LAUNCHER": "kubernetes", "MOTUS_IMAGE": IMAGE, "MOTUS_K8S_POLL_S": "0.1",
                 "KUBECONFIG": str(tmp_path / "kubeconfig")}.items():
        monkeypatch.setenv(k, v)
    return _StepContext(root=tmp_path / "proj", settings=Settings())


def _stamp(ago_h: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=ago_h)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _operator(standin, script) -> object:
    """Plays the Training Operator by hand: `script(job_manifest)` for each PyTorchJob as it is created."""
    import threading

    def run():
        done = 0
        for _ in range(1200):
            posts = standin.recorded("POST", r"/pytorchjobs$")
            if len(posts) > done:
                script(done, posts[done].body)
                done += 1
                if done == script.jobs:
                    return
            threading.Event().wait(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_job_killed_past_its_restarts_moves_to_the_fallback_pool_and_is_accounted_on_both(
        standin, tmp_path, monkeypatch):
    from motus.config import Placement
    from motus.pipeline.steps.training import run_job

    pipe = _step_context(standin, tmp_path, monkeypatch)

    def script(i, job):
        name = job["metadata"]["name"]
        standin.wait_for("motus", name, ("Pending", "Created"), timeout=10)
        if i == 0:  # on h100: evicted until the backoff limit, as the operator words it
            standin.set_condition("motus", name, "Running", start=_stamp(1.0))
            standin.set_condition("motus", name, "Restarting", message=f"PyTorchJob {name} is restarting (evicted)")
            standin.set_condition("motus", name, "Failed", completion=_stamp(0.0), reason="PyTorchJobFailed",
                                  message=f"Job {name} has failed because it has reached the specified backoff limit")
        else:  # the resubmission: runs on a100 to the end
            standin.set_condition("motus", name, "Running", start=_stamp(0.5))
            standin.set_condition("motus", name, "Succeeded", completion=_stamp(0.0))
    script.jobs = 2
    t = _operator(standin, script)
    run_dir, job = run_job(pipe, "stage3", "f" * 64, 8, placement=Placement(pool="h100", nodes=2, fallback="a100"))
    t.join(5)
    first, second = (p.body for p in standin.recorded("POST", r"/pytorchjobs$"))
    assert first["metadata"]["labels"]["motus/pool"] == "h100" and second["metadata"]["labels"]["motus/pool"] == "a100"
    assert second["metadata"]["labels"][k8s.QUEUE_LABEL] == "motus-a100"
    # the same run folder (relative to the workspace volume): the resubmitted job resumes the killed one
    assert json.dumps(first["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]) \
        .count(str(run_dir.relative_to(pipe.root))) == 1
    assert first["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"] == \
        second["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert standin.recorded("DELETE", r"/pytorchjobs/" + first["metadata"]["name"] + "$")  # the failed one replaced
    assert any("killed on h100" in ln and "resubmitting to its fallback pool a100" in ln for ln in pipe.lines)
    # 2 nodes x 8 GPUs x 1 h on h100, then 2 x 8 x 0.5 h on a100; the version names the job that finished it
    assert job["device_hours_by_pool"] == pytest.approx({"h100": 16.0, "a100": 8.0}, abs=0.05)
    assert job["device_hours"] == pytest.approx(24.0, abs=0.1)
    assert job["pool"] == "a100" and job["pools"] == "h100,a100" and job["restarts"] == 1


def test_a_pipeline_job_deleted_while_it_runs_fails_its_step_and_is_not_retried(standin, tmp_path, monkeypatch):
    import threading

    from motus.config import Placement
    from motus.pipeline.errors import PipelineError, is_infrastructure_error
    from motus.pipeline.steps.training import run_job

    pipe = _step_context(standin, tmp_path, monkeypatch)
    cluster = k8s.ClusterClient(tmp_path / "kubeconfig")

    def script(i, job):
        name = job["metadata"]["name"]
        standin.set_condition("motus", name, "Running", start=_stamp(0.1))
        standin.wait_for("motus", name, ("Running",))
        threading.Event().wait(0.3)  # the step has seen it running
        cluster.cancel(name)  # `motus k8s cancel` / kubectl delete, from someone else
    script.jobs = 1
    t = _operator(standin, script)
    with pytest.raises(PipelineError, match=r"stage1 was cancelled: PyTorchJob motus/motus-stage1-\w+ was deleted "
                                            r"while Running; nothing was registered") as err:
        run_job(pipe, "stage1", "e" * 64, 8, placement=Placement(pool="h100"))
    t.join(5)
    assert not is_infrastructure_error(err.value)  # the flow does not resubmit what its owner deleted
