"""The pipeline: content keys, the plan's reasons, and the whole tiny recipe run for real as a Prefect flow
(ephemeral Prefect, SQLite MLflow, a local DVC remote), rerun from cache, changed, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from motus.config import validate_params
from motus.pipeline import build_steps, is_infrastructure_error
from motus.pipeline.keys import StepInputs, explain
from motus.pipeline.pipeline import GateFailed, InfrastructureError, PipelineError
from motus.pipeline.steps import KINDS
from motus.track.registry.lock import LockTimeout

from ..support.project import MOTUS, REPO, make_project, project_env

# ------------------------------------------------------------------------------------------ contracts


def test_steps_come_after_what_they_need():
    params = validate_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    steps = build_steps(params)
    order = {s.name: i for i, s in enumerate(steps)}
    for s in steps:
        for d in s.deps:
            assert order[d] < order[s.name], f"{s.name} runs before its dependency {d}"
    assert "gate:motus-vgm" in {d for s in steps if s.name == "stage2" for d in s.deps}
    assert [s.name for s in steps][-3:] == ["stage3", "evaluate:motus-aloha", "gate:motus-aloha"]
    assert {s.name for s in steps if s.kind == "tier"} == {f"tier:{t}" for t in params.tiers}
    assert {s.target for s in steps if s.kind == "flow"} == set(params.stages["stage2"].tiers)
    # every tier a stage reads is encoded once, before the first stage that reads it
    read = {t for s in params.stages.values() for t in s.tiers}
    assert {s.target for s in steps if s.kind == "encode"} == read
    for key, stage in params.stages.items():
        assert {f"encode:{t}" for t in stage.tiers} <= set(next(s.deps for s in steps if s.name == key))


def test_keys_are_stable_and_changes_are_named():
    code = KINDS["tier"].code()
    assert "config.py" in code and any(p.startswith("data/") for p in code)
    a = StepInputs(code, {"tiers.x.source.options.seed": 1}, {"tier:x": "a" * 64}, "motus-vgm/1")
    same = StepInputs(dict(code), {"tiers.x.source.options.seed": 1}, {"tier:x": "a" * 64}, "motus-vgm/1")
    assert a.key() == same.key() and len(a.key()) == 64
    b = StepInputs({**code, "data/tier.py": "0" * 64}, {"tiers.x.source.options.seed": 2}, {"tier:x": "b" * 64},
                   "motus-vgm/2")
    assert b.key() != a.key()
    why = explain(a, b)
    assert "code motus/data/tier.py changed" in why
    assert "config tiers.x.source.options.seed: 1 -> 2" in why
    assert f"input tier:x: {'a' * 12} -> {'b' * 12}" in why
    assert "parent motus-vgm/1 -> motus-vgm/2" in why
    assert explain(a, same) == []


def test_only_infrastructure_errors_are_retried():
    assert is_infrastructure_error(InfrastructureError("killed"))
    assert is_infrastructure_error(ConnectionError("refused"))
    assert is_infrastructure_error(LockTimeout("registry lock 'motus-vgm.lock' is still taken after 60s"))
    assert not is_infrastructure_error(GateFailed("val/action_loss 3.1 > 2.5"))
    assert not is_infrastructure_error(PipelineError("stage3 failed (exit 1)"))
    assert not is_infrastructure_error(ValueError("bad config"))


def test_a_failure_repeated_the_same_way_is_not_retried_a_third_time():
    from motus.pipeline.errors import RetryGuard

    guard = RetryGuard()
    evicted = "stage3 was killed (Job motus-stage3-{} has failed because it has reached the specified backoff limit)"
    assert guard.retry("run-1", InfrastructureError(evicted.format("1f2e3d4c")))[0]
    again, why = guard.retry("run-1", InfrastructureError(evicted.format("1f2e3d4c")))
    assert not again and "same way twice" in why  # the flow's third try never starts
    # a different failure in between, or another step's, is judged on its own
    assert guard.retry("run-2", InfrastructureError(evicted.format("1f2e3d4c")))[0]
    assert guard.retry("run-2", ConnectionError("tracking server refused the connection"))[0]
    assert guard.retry("run-2", InfrastructureError(evicted.format("1f2e3d4c")))[0]
    assert not guard.retry("run-3", PipelineError("stage3 failed (exit 1)"))[0]


def test_cli_names_bad_steps_and_missing_production_services(tmp_path):
    proj = make_project(tmp_path / "p")
    env = project_env(proj)
    r = subprocess.run([str(MOTUS), "pipeline", "run", "--from", "stage9"], cwd=proj, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--from stage9: no such step" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([str(MOTUS), "pipeline", "run", "--profile", "production"], cwd=proj, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "MOTUS_TRACKING_URI must be an MLflow server" in r.stderr
    assert "PREFECT_API_URL" in r.stderr and "MOTUS_DATA_REMOTE" in r.stderr
    # MOTUS_PROFILE is the default of --profile
    r = subprocess.run([str(MOTUS), "pipeline", "run"], cwd=proj, env=dict(env, MOTUS_PROFILE="production"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "MOTUS_TRACKING_URI must be an MLflow server" in r.stderr


# ------------------------------------------------------------------------------------------ the spine


def pipeline(proj: Path, *args: str, env: dict | None = None, timeout: int = 1200, expect: int = 0) -> tuple[dict, str]:
    r = subprocess.run([str(MOTUS), "pipeline", *args], cwd=proj, env=env or project_env(proj), capture_output=True,
                       text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == expect, f"motus pipeline {' '.join(args)} exited {r.returncode}:\n{out[-6000:]}"
    report = json.loads((proj / "outputs" / "pipeline" / "last-run.json").read_text()) if args[0] == "run" else {}
    return report, out


def statuses(report: dict) -> dict[str, str]:
    return {s["step"]: s["status"] for s in report["steps"]}


def kill_tree(pattern: str) -> None:
    """SIGKILL every process whose command line mentions `pattern` (the pipeline and its training job)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if pattern in " ".join(p.info["cmdline"] or []):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def dvc(cwd: Path, *args: str) -> str:
    r = subprocess.run([str(MOTUS.parent / "dvc"), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    assert r.returncode == 0, f"dvc {' '.join(args)} in {cwd}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def one_data_pipeline(proj: Path, clone: Path) -> None:
    """dvc.yaml and the pipeline are the same data pipeline: after a run `dvc status` has nothing to do, and a
    second checkout with the same remote gets back every tier and feature a training step read."""
    from motus.config import load_params
    from motus.data.features import Feature
    from motus.data.paths import ProjectPaths
    from motus.data.tier import Tier

    assert json.loads(dvc(proj, "status", "--json") or "{}") == {}
    for f in ("params.yaml", "dvc.yaml", "dvc.lock"):
        (clone / f).write_bytes((proj / f).read_bytes())
    dvc(clone, "init", "--no-scm", "--quiet")
    dvc(clone, "remote", "add", "--default", "motus", str(proj / "remote"))
    dvc(clone, "pull")
    params = load_params(proj / "params.yaml")
    here, there = ProjectPaths.of(params, proj), ProjectPaths.of(params, clone)
    for t in params.tiers:
        assert Tier(there.tier(t)).content_hash == Tier(here.tier(t)).content_hash, t
    features = [(k, t) for k in ("flow", "latent_actions") for t in params.stages["stage2"].tiers]
    features += [("encoded", t) for s in params.stages.values() for t in s.tiers]
    assert features
    for kind, t in features:
        assert Feature(there.feature(kind, t)).content_hash == Feature(here.feature(kind, t)).content_hash, (kind, t)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("pipeline") / "proj")
    return proj


PYFUNC_PROBE = """
import json, mlflow, numpy as np
m = mlflow.pyfunc.load_model("models:/motus-aloha@champion")
spec = {i.name: i.shape for i in m.metadata.get_input_schema().inputs}
out = m.predict({"image": np.zeros((1, *spec["image"][1:]), np.uint8),
                 "state": np.zeros((1, spec["state"][1]), np.float32), "instruction": np.asarray(["pick up the cube"])},
                params={"seed": 0, "tier": "target-aloha-transfer"})
print(json.dumps({"shape": list(out.shape[1:]), "finite": bool(np.isfinite(out).all())}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five pipeline runs; ~8 min alone, up to twice that beside two other workers
def test_whole_recipe_then_cached_then_one_tier_changed_killed_and_resumed(project, tmp_path_factory):
    proj = project
    # 1. the whole recipe, from nothing
    report, out = pipeline(proj, "run", "--eval-seeds", "2")
    st = statuses(report)
    assert report["status"] == "completed", out[-4000:]
    assert all(v == "ran" for v in st.values()), st
    champions = report["champions"]
    assert all(isinstance(v, int) for v in champions.values()), champions
    assert "champions: motus-vgm: v1" in out and "next:" in out
    first_keys = {s["step"] for s in report["steps"]}
    # every stage job read its windows from the encoder caches the pipeline built (no video decoded in the loop)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{proj}/mlflow.db")
    stage_runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                  if r.data.tags.get("stage") in ("stage1", "stage2", "stage3")]
    assert {r.data.tags["stage"] for r in stage_runs} == {"stage1", "stage2", "stage3"}
    assert {r.data.tags.get("encoder_cache") for r in stage_runs} == {"read"}, \
        {r.data.tags["stage"]: r.data.tags.get("encoder_cache") for r in stage_runs}
    # the pipeline's Stage 3 champion is an MLflow model: a fresh process loads it by alias and acts
    probe = subprocess.run([str(Path(MOTUS).parent / "python"), "-c", PYFUNC_PROBE], cwd=proj,
                           env=dict(project_env(proj), MLFLOW_TRACKING_URI=f"sqlite:///{proj}/mlflow.db"),
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    chunk = json.loads(probe.stdout.strip().splitlines()[-1])
    assert chunk["shape"][1:] == [14] and chunk["finite"], chunk
    one_data_pipeline(proj, tmp_path_factory.mktemp("clone"))

    # 2. again: nothing to do
    report, _ = pipeline(proj, "run", "--eval-seeds", "2")
    st = statuses(report)
    assert {k for k, v in st.items() if v != "cached" and not k.startswith("gate:")} == set(), st
    assert set(st) == first_keys and report["champions"] == champions
    _, plan = pipeline(proj, "plan", "--eval-seeds", "2")
    assert "0 to run" in plan

    # 3. one tier changes (and the final gate becomes impossible): the plan names the change and exactly its
    #    downstream steps
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    seed = raw["tiers"]["target-aloha-insertion"]["source"]["options"]["seed"]
    raw["tiers"]["target-aloha-insertion"]["source"]["options"]["seed"] = seed + 1
    # a longer Stage 3, so that step 4 can kill it between its first checkpoint and its end
    raw["stages"]["stage3"].update(steps=40, validate_every=40)
    loose_rules = raw["gates"]["motus-aloha"]["rules"]
    raw["gates"]["motus-aloha"]["rules"] = [{"metric": "val/action_loss", "comparator": "<=", "threshold": 0.0}]
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _, plan = pipeline(proj, "plan", "--eval-seeds", "2", "--json")
    rows = {r["step"]: r for r in json.loads(plan[plan.index("["):])}
    to_run = {k for k, r in rows.items() if r["action"] == "run" and r["kind"] != "gate"}
    assert to_run == {"tier:target-aloha-insertion", "encode:target-aloha-insertion", "stage3",
                      "evaluate:motus-aloha"}, to_run
    assert rows["encode:target-aloha-insertion"]["why"] == ["after tier:target-aloha-insertion"]
    assert (f"config tiers.target-aloha-insertion.source.options.seed: {seed} -> {seed + 1}"
            in rows["tier:target-aloha-insertion"]["why"])
    assert rows["gate:motus-aloha"]["action"] in ("run", "check")

    # 4. run it, kill everything once Stage 3 has a complete checkpoint, run again: Stage 3 resumes, and the
    #    pipeline stops at the gate naming the rule
    env = project_env(proj)
    proc = subprocess.Popen([str(MOTUS), "pipeline", "run", "--eval-seeds", "2"], cwd=proj, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = proj / "outputs" / "pipeline" / "runs"
    deadline = time.time() + 600
    ckpt = None
    while time.time() < deadline and ckpt is None:
        time.sleep(0.2)
        for d in runs.glob("stage3-*"):
            done = [c for c in (d / "checkpoints").glob("step-*") if (c / "manifest.json").exists()]
            if done and not (d / "export").exists():
                ckpt = d
        assert proc.poll() is None, "the pipeline ended before Stage 3 wrote a checkpoint"
    assert ckpt is not None, "no Stage 3 checkpoint within 10 minutes"
    os.killpg(proc.pid, signal.SIGKILL)
    kill_tree(str(ckpt))
    proc.wait(30)
    report, out = pipeline(proj, "run", "--eval-seeds", "2", expect=3)
    st = statuses(report)
    ran = {k for k, v in st.items() if v == "ran" and not k.startswith("gate:")}
    # the changed tier was rebuilt before the kill: now it is cached, and only Stage 3 onwards runs
    assert ran == {"stage3", "evaluate:motus-aloha"} and st["tier:target-aloha-insertion"] == "cached", st
    assert st["encode:target-aloha-insertion"] == "cached", st
    assert "stage3: resuming" in out
    steps_logged = [json.loads(line)["step"] for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged.count(1) == 1 and steps_logged[-1] == raw["stages"]["stage3"]["steps"]
    assert report["status"] == "stopped at a gate" and st["gate:motus-aloha"] == "failed"
    assert "val/action_loss" in report["error"] and report["champions"] == champions

    # 5. the gate policy is fixed: only the gate runs, and the new version becomes champion
    raw["gates"]["motus-aloha"]["rules"] = loose_rules
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    report, _ = pipeline(proj, "run", "--eval-seeds", "2")
    st = statuses(report)
    assert {k for k, v in st.items() if v == "ran"} == {f"gate:{m}" for m in champions}, st
    assert report["champions"]["motus-aloha"] == champions["motus-aloha"] + 1


@pytest.mark.slow
def test_production_profile_on_kubernetes_runs_every_job_as_a_two_node_pytorchjob(tmp_path):
    """Every service of the production profile, started here on 127.0.0.1: PostgreSQL databases for MLflow and
    Prefect, an S3 server (DVC remote, MLflow artifacts, checkpoint mirror), the MLflow and Prefect servers; the
    recipe deployed to a process work pool and run by a real worker, with MOTUS_LAUNCHER=kubernetes: every
    training step is a 2-node PyTorchJob on the stand-in cluster, whose pods are real processes working in the
    project folder (the workspace volume a Prefect worker in the cluster would share with the jobs).

    Secrets are planted in every credential-bearing variable the platform's processes see (the tracking URI's
    password, MLflow's, the object store's secret key, an API token): after the pipeline (its training jobs, its
    evaluation, its registrations and promotions) none of them is in any output, file, database dump, S3
    object or object of the cluster other than the Secret that holds them."""
    import asyncio
    import sys

    import boto3
    from mlflow import MlflowClient

    from ..support.k8s_standin import Image, KubeApiStandIn
    from ..support.project import MINIMAL_TIERS, REPO, S3_CREDENTIALS, add_flows
    from ..support.servers import fresh_postgres_database, mlflow_server, prefect_server, s3_server

    # what this test proves is the services and the cluster path (the spine proves the recipe): the fewest
    # tiers, short stages, every training job on two nodes of a CPU pool
    proj = make_project(tmp_path / "proj", steps=2, tiers=MINIMAL_TIERS)
    add_flows(proj)
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    raw["pools"]["cpu"] = {"gpu": "cpu", "gpus_per_node": 0, "queue": "motus-cpu"}
    for section in (*raw["stages"].values(), raw["latent_action"]):
        section["cluster"] = {"pool": "cpu", "nodes": 2}
    # Stage 3 long enough to be evicted between its first checkpoint and its end
    raw["stages"]["stage3"].update(steps=8, checkpoint_every=2, validate_every=8)
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    image = "registry.example/motus-train:test"
    node_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "PYTHONSAFEPATH": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
                "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    planted = {"uri": "uriPLANTED53c", "mlflow": "mlflowPLANTED77", "aws": "awsPLANTEDsecret41",
               "token": "tokPLANTED3c3c"}
    creds = {**S3_CREDENTIALS, "AWS_SECRET_ACCESS_KEY": planted["aws"]}  # moto takes any key
    with (s3_server() as s3, fresh_postgres_database("motus_mlflow") as mlflow_db,
          fresh_postgres_database("motus_prefect") as prefect_db,
          KubeApiStandIn(run_pods=True, volumes={"motus-workspace": proj},
                         images={image: Image(sys.executable, node_env)}) as cluster):
        cluster.add_secret("motus", "motus-s3", {k: v for k, v in creds.items() if k.startswith("AWS_")})
        kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
        bucket = boto3.client("s3", endpoint_url=s3, **{k.lower(): v for k, v in S3_CREDENTIALS.items()
                                                       if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
        bucket.create_bucket(Bucket="motus")
        with (mlflow_server(mlflow_db, tmp_path / "mlflow", artifacts_destination="s3://motus/mlflow",
                            env={"MLFLOW_S3_ENDPOINT_URL": s3, **S3_CREDENTIALS}) as tracking,
              prefect_server(prefect_db, tmp_path / "prefect-home") as api):
            env = project_env(proj, MOTUS_TRACKING_URI=tracking.replace("http://", f"http://svc:{planted['uri']}@"),
                              MOTUS_DATA_REMOTE="s3://motus/dvc",
                              MOTUS_S3_ENDPOINT_URL=s3, PREFECT_API_URL=api, MOTUS_PROFILE="production",
                              MOTUS_LAUNCHER="kubernetes", MOTUS_IMAGE=image, KUBECONFIG=str(kubeconfig),
                              MOTUS_K8S_POLL_S="0.5", MLFLOW_TRACKING_USERNAME="svc",
                              MLFLOW_TRACKING_PASSWORD=planted["mlflow"], MOTUS_API_TOKEN=planted["token"], **creds)
            outputs: list[str] = []
            r = subprocess.run([str(MOTUS), "pipeline", "deploy", "--pool", "motus-process", "--eval-seeds", "1"],
                               cwd=proj, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "deployment motus-pipeline/recipe" in r.stdout
            outputs.append(r.stdout + r.stderr)
            prefect = str(MOTUS.parent / "prefect")
            r = subprocess.run([prefect, "deployment", "run", "motus-pipeline/recipe"], cwd=proj, env=env,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            outputs.append(r.stdout + r.stderr)
            evicted: list[str] = []

            def preempt_stage3():  # a node drain: the Stage 3 Master is evicted once it has a checkpoint
                deadline = time.time() + 1200
                while time.time() < deadline and not evicted:
                    done = list((proj / "outputs" / "pipeline" / "runs").glob("stage3-*/checkpoints/step-*/manifest.json"))  # committed ones
                    pods = [p for (_, p), pod in list(cluster.pods.items()) if p.endswith("-master-0")
                            and pod["metadata"]["labels"].get("motus/stage") == "stage3"
                            and pod["status"].get("phase") == "Running"]
                    if done and pods:
                        cluster.evict("motus", pods[0])
                        evicted.append(pods[0])
                    time.sleep(0.2)

            import threading

            threading.Thread(target=preempt_stage3, daemon=True).start()
            worker = subprocess.run([prefect, "worker", "start", "--pool", "motus-process", "--run-once"], cwd=proj,
                                    env=env, capture_output=True, text=True, timeout=1500)
            log = worker.stdout + worker.stderr
            outputs.append(log)

            async def flow_runs():
                from prefect.client.orchestration import get_client

                async with get_client() as client:
                    return await client.read_flow_runs()

            os.environ["PREFECT_API_URL"] = api
            try:
                runs = asyncio.run(flow_runs())
            finally:
                os.environ.pop("PREFECT_API_URL", None)
            assert [fr.state.type.value for fr in runs] == ["COMPLETED"], log[-6000:]
            client = MlflowClient(tracking)
            champion = client.get_model_version_by_alias("motus-aloha", "champion")
            assert int(champion.version) == 1
            keys = [o["Key"] for o in bucket.list_objects_v2(Bucket="motus").get("Contents", [])]
            assert any(k.startswith("dvc/") for k in keys), "the tiers were not pushed to the S3 DVC remote"
            assert any(k.startswith("mlflow/") for k in keys), "no MLflow artifact reached S3"

            # every training step ran as a 2-node PyTorchJob on the cpu pool, and its version says which
            jobs = {name: job for (ns, name), job in cluster.jobs.items()}
            assert len(jobs) == 4 and all(cluster.state("motus", n) == "Succeeded" for n in jobs), \
                {n: cluster.state("motus", n) for n in jobs}
            for name in jobs:
                pods = {p for (_, p), pod in cluster.pods.items() if pod["metadata"]["labels"][
                    "training.kubeflow.org/job-name"] == name}
                assert pods == {f"{name}-master-0", f"{name}-worker-0"}, pods
            for model in ("motus-lam", "motus-vgm", "motus-latent-action", "motus-aloha"):
                tags = client.get_model_version(model, "1").tags
                assert tags["motus.job.name"] in jobs and tags["motus.job.pool"] == "cpu", tags
                assert tags["motus.job.nodes"] == "2" and float(tags["motus.job.device_hours"]) > 0, tags
                assert tags["motus.job.uid"] == jobs[tags["motus.job.name"]]["metadata"]["uid"]
            # the Master mirrored its checkpoints and export to S3 (what a job on another volume resumes from)
            assert any(k.startswith("runs/") and "/export/" in k for k in keys), "no export in the S3 mirror"
            # the evicted Stage 3 restarted, resumed from its checkpoint, and its goodput shows what was lost
            assert evicted, "Stage 3 ended before it could be evicted"
            s3_tags = client.get_model_version("motus-aloha", "1").tags
            assert int(s3_tags["motus.job.restarts"]) >= 1 and evicted[0].startswith(s3_tags["motus.job.name"])
            assert 0 < float(s3_tags["motus.job.goodput"]) < 1 and float(s3_tags["motus.job.lost_device_hours"]) > 0
            run = client.get_run(champion.run_id)
            assert 0 < run.data.metrics["goodput/goodput"] < 1
            stage3_dir = next((proj / "outputs" / "pipeline" / "runs").glob("stage3-*"))
            steps = [json.loads(line)["step"] for line in (stage3_dir / "metrics.jsonl").read_text().splitlines()
                     if "train/loss" in json.loads(line)]
            assert steps.count(1) == 1 and steps[-1] == 8, steps  # resumed, never restarted from scratch
            report = json.loads((proj / "outputs" / "pipeline" / "last-run.json").read_text())
            shown = subprocess.run([str(MOTUS), "lineage", "show", "models:/motus-aloha@champion", "--no-attach"],
                                   cwd=proj, env=dict(env, COLUMNS="200"), capture_output=True, text=True, timeout=120)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            for name in jobs:  # the four jobs and their pool, and the chain's cluster device-hours
                assert f"job motus/{name} on cpu (2 x 0 GPU), goodput" in shown.stdout, shown.stdout
            assert "cluster jobs: cpu " in shown.stdout
            stage3_row = next(r for r in report["steps"] if r["step"] == "stage3")
            assert report["lost_device_hours"] >= stage3_row["lost_device_hours"] > 0 and stage3_row["goodput"] < 1
            assert report["device_hours_by_pool"]["cpu"] == pytest.approx(
                sum(s["device_hours"] or 0 for s in report["steps"] if s.get("pool") == "cpu"))
            outputs.append(shown.stdout + shown.stderr)

            # the secrets scan: outputs, every file, both databases, every S3 object, the cluster's objects
            texts = {f"output {i}": t for i, t in enumerate(outputs)}
            for root in (proj, tmp_path / "mlflow", tmp_path / "prefect-home"):
                for f in Path(root).rglob("*"):
                    if f.is_file() and f != kubeconfig:
                        texts[str(f)] = f.read_bytes().decode("latin-1")
            for uri in (mlflow_db, prefect_db):
                dump = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres", uri.rsplit("/", 1)[1]],
                                      capture_output=True, text=True, timeout=120)
                assert dump.returncode == 0 and "CREATE TABLE" in dump.stdout, dump.stderr
                texts[f"pg_dump {uri}"] = dump.stdout
            for obj in bucket.list_objects_v2(Bucket="motus").get("Contents", []):
                body = bucket.get_object(Bucket="motus", Key=obj["Key"])["Body"].read()
                texts[f"s3://motus/{obj['Key']}"] = body.decode("latin-1")
            for kind in ("jobs", "pods", "configmaps"):
                texts[f"cluster {kind}"] = json.dumps({str(k): v for k, v in getattr(cluster, kind).items()})
            texts["cluster requests"] = json.dumps([vars(q) for q in cluster.requests if "/secrets" not in q.path],
                                                   default=str)
            found = sorted({(name, where) for name, secret in planted.items() for where, t in texts.items()
                            if secret in t})
            context = [texts[w][max(0, texts[w].index(planted[n]) - 160):texts[w].index(planted[n]) + 60]
                       .replace(planted[n], f"<{n}>") for n, w in found[:3]]
            assert len(texts) > 100 and not found, f"secrets found: {found[:20]} (of {len(texts)} places): {context}"
