"""Stage jobs end to end: 2 CPU processes under torchrun, DeepSpeed, checkpoints, resume after kill -9, MLflow."""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from motus.config import load_params
from motus.contracts import LineageRecord
from motus.model import MotusModel, build_config, tiny
from motus.train.parent import ParentLoadError, load_parent
from motus.train.run_lock import holder

from ..support.project import MOTUS, project_env

pytestmark = pytest.mark.slow


def env_for(proj: Path) -> dict:
    return project_env(proj)


def train(proj: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(MOTUS), "train", *args], cwd=proj, env=env_for(proj), capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, f"motus train {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a resumed job re-logs steps after its checkpoint: the last record wins."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["train/loss"]
    return out


def mlflow_run(proj: Path, run_dir: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{proj}/mlflow.db")
    rid = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    return client, client.get_run(rid)


def artifacts(client, rid, path=None) -> list[str]:
    out = []
    for a in client.list_artifacts(rid, path):
        out += artifacts(client, rid, a.path) if a.is_dir else [a.path]
    return out


def test_stage1_then_stage3_two_processes(project):
    """bf16 mixed precision on this CPU: the very code path a GPU's `auto` selects."""
    r1 = train(project, "--stage", "1", "--nproc", "2", "--run-dir", "runs/s1", "--precision", "bf16")
    run1 = project / "runs" / "s1"
    l1 = losses(run1)
    assert sorted(l1) == list(range(1, 9))
    assert all(math.isfinite(v) for v in l1.values()), l1
    assert "precision bf16" in r1.stdout
    assert sum(l1[s] for s in (6, 7, 8)) < sum(l1[s] for s in (1, 2, 3)), l1  # losses fall
    assert (run1 / "checkpoints" / "step-000008" / "manifest.json").exists()
    assert (run1 / "checkpoints" / "latest").read_text().strip() == "step-000008"
    export = run1 / "export"
    assert {"model.safetensors", "motus_config.json", "lineage.json"} <= {p.name for p in export.iterdir()}
    assert "stage1: done" in r1.stdout
    # the same command again (a pipeline rerun after a crash while registering): the finished job's export stands
    # as written, so its content hash, and the version it registers as, cannot change
    before = {f.name: f.read_bytes() for f in export.iterdir()}
    train(project, "--stage", "1", "--nproc", "2", "--run-dir", "runs/s1", "--precision", "bf16")
    assert {f.name: f.read_bytes() for f in export.iterdir()} == before

    train(project, "--stage", "3", "--nproc", "2", "--run-dir", "runs/s3", "--init-from", str(export),
          "--precision", "bf16")
    run3 = project / "runs" / "s3"
    l3 = losses(run3)
    assert all(math.isfinite(v) for v in l3.values()), l3
    assert sum(l3[s] for s in (6, 7, 8)) < sum(l3[s] for s in (1, 2, 3)), l3
    lineage = LineageRecord.read(run3 / "export")
    assert lineage.parent == str(export)
    assert {t.name for t in lineage.tiers} == {"target-aloha-transfer", "target-aloha-insertion"}
    assert lineage.precision == "bf16"
    manifest = json.loads((run3 / "checkpoints" / "step-000008" / "manifest.json").read_text())
    assert manifest["extra"]["precision"] == "bf16"

    client, run = mlflow_run(project, run3)
    assert run.info.status == "FINISHED"
    # the lineage record names the run and the code state the worker saw
    assert lineage.run_id == run.info.run_id and lineage.code_commit == run.data.tags["code.commit"]
    assert str(lineage.code_dirty).lower() == run.data.tags["code.dirty"]
    assert run.data.params["params.stages.stage3.lr"] == "0.002"
    assert run.data.params["job.precision"] == "bf16" and run.data.tags["precision"] == "bf16"
    assert run.data.tags["code.commit"] and run.data.tags["code.dirty"] in ("true", "false")
    assert run.data.params["code.commit"] == run.data.tags["code.commit"] and "code.dirty" in run.data.params
    for key in ("train/loss", "train/video_loss", "train/action_loss", "train/grad_norm", "lr/video", "lr/experts",
                "perf/samples_per_s", "perf/step_time_s", "perf/mfu", "cost/device_hours", "cost/amount",
                "val/video_loss", "val/action_loss", "val/vla_action_mse", "val/wm_video_psnr",
                "val/vla_action_mse_x0", "val/floor_zero_action_mse", "val/wm_video_mse_x0"):
        assert key in run.data.metrics, key
    val = run.data.metrics
    # an untrained sampler returns its N(0, 1) noise: its error is 1 + the zero-action floor of the same windows
    assert val["val/untrained_action_mse"] == pytest.approx(1 + val["val/floor_zero_action_mse"])
    assert val["val/draws"] == 3 and val["val/windows"] >= 2  # both held-out tiers' windows, three noise draws
    assert any(k.startswith("system/") for k in run.data.metrics)
    assert run.data.metrics["cost/device_hours"] > 0 and run.data.tags["device_type"] == "cpu"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 8
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    tiers = load_params(project / "params.yaml").stages["stage3"].tiers
    assert set(digests) == set(tiers)
    arts = artifacts(client, run.info.run_id)
    for want in ("config/config.json", "checkpoint/manifest.json", "loss_curve.png", "export/lineage.json"):
        assert want in arts, (want, arts)
    assert any(a.startswith("validation/frames_") for a in arts)


def test_kill_minus_9_then_resume_matches_an_uninterrupted_run(project):
    bf16 = ("--precision", "bf16")
    train(project, "--stage", "3", "--nproc", "2", "--run-dir", "runs/straight", "--no-track", *bf16)
    straight = losses(project / "runs" / "straight")

    run_dir = project / "runs" / "killed"
    proc = subprocess.Popen([str(MOTUS), "train", "--stage", "3", "--nproc", "2", "--run-dir", str(run_dir), "--no-track",
                             *bf16],
                            cwd=project, env=env_for(project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    job = os.getpgid(holder(run_dir)["pid"])  # rank 0's group: the rest dies with the launcher's guard
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: launcher and both workers, mid-training
    os.killpg(job, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "step-000008").exists()
    _wait_free(run_dir)  # every worker is gone (rank 0 held the run folder's lock until it died)
    # a half-written checkpoint from the kill, if any, is a .tmp-* folder that resume ignores
    train(project, "--stage", "3", "--nproc", "2", "--run-dir", str(run_dir), "--no-track", *bf16)
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])
    manifest = json.loads((run_dir / "checkpoints" / "step-000008" / "manifest.json").read_text())
    assert manifest["data_position"] == 8 * 4

    # the same job resumed under another precision: refused, naming both
    r = train(project, "--stage", "3", "--nproc", "1", "--run-dir", str(run_dir), "--no-track", "--precision", "fp32",
              check=False)
    assert r.returncode != 0
    assert "written with precision bf16; this job runs fp32" in r.stdout + r.stderr


def _wait_free(run_dir: Path, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while holder(run_dir) is not None:
        assert time.time() < deadline, f"a job still holds {run_dir}: {holder(run_dir)}"
        time.sleep(0.1)


def _processes_naming(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `text`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state not in ("Z", "X"):
            found.append(int(d.name))
    return found


def test_killing_motus_train_leaves_no_orphan_and_a_second_job_on_its_folder_is_refused(project):
    """SIGKILL to `motus train`'s process group (a closed terminal, a killed CI step): torchrun and both workers
    stop too; while the job runs, another `motus train` on the same run folder is refused naming the holder.
    Cold job processes here, so every process of the job names its run folder on its command line."""
    run_dir = project / "runs" / "guarded"
    env = {**env_for(project), "MOTUS_WARM_JOBS": "false"}
    # long enough (400 steps) to be still training when the second command and the kill land, however busy
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["stages"]["stage3"].update(steps=400, checkpoint_every=400, validate_every=400)
    (project / "params-guarded.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = [str(MOTUS), "train", "--stage", "3", "--nproc", "2", "--run-dir", str(run_dir), "--no-track",
           "--params", "params-guarded.yaml"]
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while holder(run_dir) is None:  # rank 0 takes the folder before it builds anything
        assert proc.poll() is None and time.time() < deadline, "the job ended before it could be seen running"
        time.sleep(0.05)
    rank0 = holder(run_dir)["pid"]
    second = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1 and f"is in use by pid {rank0} on" in second.stderr, second.stderr[-2000:]
    job = _processes_naming(str(run_dir))
    assert len(job) >= 4, job  # motus train, the guard, torchrun, two workers (at least)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while left := _processes_naming(str(run_dir)):
        assert time.time() < deadline, f"orphans of the killed job still running: {left}"
        time.sleep(0.2)
    assert holder(run_dir) is None


def test_bad_precision_fails_at_the_command_line(project):
    r = train(project, "--stage", "3", "--no-track", "--precision", "fp16", check=False)
    assert r.returncode == 2 and "fp16" in r.stderr and "bf16" in r.stderr


def test_stage2_refuses_without_latent_actions(project, tmp_path):
    # the package's project may hold latent actions by now (tests/train/test_latent_actions.py makes them)
    bare = tmp_path / "bare"
    shutil.copytree(project, bare, ignore=shutil.ignore_patterns("features", "runs", "*.db", "mlartifacts"))
    r = train(bare, "--stage", "2", "--no-track", check=False)
    assert r.returncode == 1
    assert "latent actions" in r.stderr and "never trains on fake actions" in r.stderr


def test_finetune_from_a_missing_checkpoint_fails_loudly(project):
    r = train(project, "--stage", "3", "--run-dir", "runs/bad", "--init-from", str(project / "no-such-export"),
              "--no-track", check=False)
    assert r.returncode != 0
    assert "no-such-export" in r.stdout + r.stderr and "missing or incomplete" in r.stdout + r.stderr


def test_incompatible_parent_is_fatal_and_named(tmp_path):
    other = MotusModel(build_config("small"), with_vlm=False, with_vae=False)
    other.save_pretrained(tmp_path / "small-export")
    model = MotusModel(tiny(), with_vlm=False, with_vae=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ParentLoadError, match=r"(?s)small-export' is incompatible.*shape mismatch"):
        load_parent(model, tmp_path / "small-export", drop_action_io=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "motus_config.json").write_text("{}")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ParentLoadError, match="broken' cannot be read"):
        load_parent(model, tmp_path / "broken", drop_action_io=True)


def test_a_parent_whose_action_head_is_kept_must_share_the_normalisation_of_a_shared_tier(tmp_path):
    from motus.train.parent import check_parent_normalization

    norm = {"method": "mean_std", "tier": "aloha", "embodiment": "aloha", "action_dim": 14, "padded_action_dim": 14,
            "actions": {"mean": [0.0] * 14, "std": [1.0] * 14}, "state": None}
    LineageRecord(job="stage", registered_model="motus-aloha", config_hash="c", tiers=(), stage="stage3",
                  stage_number=3, normalization={"aloha": norm}).write(tmp_path)
    minmax = {**norm, "method": "min_max", "actions": {"q01": [-1.0] * 14, "q99": [1.0] * 14}}
    with pytest.raises(ParentLoadError, match=r"tier 'aloha'.*method: model \"mean_std\", data \"min_max\""):
        check_parent_normalization(tmp_path, {"aloha": minmax, "other": norm}, keeps_action_io=True)
    check_parent_normalization(tmp_path, {"aloha": norm}, keeps_action_io=True)  # the same contract
    check_parent_normalization(tmp_path, {"aloha": minmax}, keeps_action_io=False)  # a re-initialised head: free
    check_parent_normalization(tmp_path, {"other": minmax}, keeps_action_io=True)  # no shared tier


def test_stage3_from_stage2_drops_only_the_action_io_layers(tmp_path):
    pre = build_config("tiny", {"action": {"encoder_mode": "pretrain"}})
    parent = MotusModel(pre, with_vlm=False, with_vae=False)
    with torch.no_grad():
        for p in parent.parameters():
            p.add_(1.0)
    parent.save_pretrained(tmp_path / "stage2")
    child = MotusModel(tiny(), with_vlm=False, with_vae=False)
    report = load_parent(child, tmp_path / "stage2", drop_action_io=True)
    assert all(k.startswith(("action.encoder.", "action.decoder.head.")) for k in report["dropped"])
    assert "action.encoder.state_in.0.weight" in report["dropped"]
    ps = dict(parent.named_parameters())
    for k, v in child.named_parameters():
        if k in report["loaded"] and k.startswith(("video.", "understanding.", "action.blocks.")):
            assert torch.equal(v, ps[k]), k
    assert child.action.decoder.head.weight.abs().sum() == 0  # re-initialised, zero like a fresh decoder


def test_planted_secrets_appear_in_no_file_database_or_output(project, tmp_path):
    """Credentials in every credential-bearing variable (the tracking URI's password, MLflow's, the object
    store's keys) through a training job against a real MLflow server, the registry and config commands and a
    failing command: none of them in any output, file of the project or the job, the server's database, artifacts
    or log."""
    from ..support.servers import mlflow_server

    secrets = {"uri": "uriPW7c1f2e", "mlflow": "mlflowPW9a8b", "aws": "awsSECRETd4e5f6", "token": "tokEN3c3c3c"}
    server_dir = tmp_path / "server"
    with mlflow_server(f"sqlite:///{server_dir}/mlflow.db", server_dir / "artifacts") as url:
        uri = url.replace("http://", f"http://svc:{secrets['uri']}@")
        env = {**env_for(project), "MOTUS_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "svc",
               "MLFLOW_TRACKING_PASSWORD": secrets["mlflow"], "AWS_ACCESS_KEY_ID": "AKIDPLANTED",
               "AWS_SECRET_ACCESS_KEY": secrets["aws"], "MOTUS_API_TOKEN": secrets["token"]}
        run_dir = project / "runs" / "secrets"

        def motus(*args: str) -> str:
            r = subprocess.run([str(MOTUS), *args], cwd=project, env=env, capture_output=True, text=True,
                               timeout=600)
            return r.stdout + r.stderr

        outputs = [motus("train", "--stage", "1", "--run-dir", str(run_dir)),
                   motus("config", "show"), motus("config", "show", "-f", "json"), motus("registry", "list"),
                   motus("registry", "evaluate", "no-such-model", "1")]
        assert "svc:***@127.0.0.1" in outputs[1] and "error" in outputs[4].lower()
        assert json.loads((run_dir / "run.json").read_text())["tracking_uri"] == uri.replace(secrets["uri"], "***")
    texts = list(outputs)
    for root in (run_dir, server_dir, project / "outputs"):
        for f in Path(root).rglob("*"):
            if f.is_file():
                texts.append(f.read_bytes().decode("latin-1"))
    found = [(name, i) for name, s in secrets.items() for i, t in enumerate(texts) if s in t]
    assert not found, f"secrets found: {found} (of {len(texts)} outputs and files)"
