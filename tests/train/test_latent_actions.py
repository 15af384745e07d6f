"""Latent actions end to end: flow features -> the VAE job (DeepSpeed, 2 processes) -> export -> Stage 2."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml

from motus.config import load_params
from motus.data.features import Feature
from motus.data.tier import Tier
from motus.train.latent_action import linear_probe_r2, r2_score

from ..support.project import shipped_params, write_project
from .test_train import MOTUS, env_for, losses

pytestmark = pytest.mark.slow


def run(proj, *args):
    r = subprocess.run([str(MOTUS), *args], cwd=proj, env=env_for(proj), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"motus {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def test_flow_train_export_then_stage2(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["latent_action"].update(steps=12, batch_size=16, checkpoint_every=6, validate_every=12)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(project / "params.yaml")
    tiers = list(params.stages["stage2"].tiers)

    run(project, "latent-action", "flow")
    run(project, "latent-action", "train", "--nproc", "2", "--run-dir", "runs/lam", "--precision", "bf16")
    lam = project / "runs" / "lam"
    recon = [json.loads(x)["lam/train/recon_loss"] for x in (lam / "metrics.jsonl").read_text().splitlines()
             if "lam/train/recon_loss" in x]
    assert np.isfinite(recon).all() and len(recon) == 12
    assert np.mean(recon[-3:]) < np.mean(recon[:3])  # reconstruction loss falls
    assert json.loads((lam / "checkpoints" / "step-000012" / "manifest.json").read_text())["extra"]["precision"] == "bf16"
    metrics = [json.loads(x) for x in (lam / "metrics.jsonl").read_text().splitlines()]
    assert any("lam/recon_psnr" in m for m in metrics)
    assert (lam / "checkpoints" / "step-000012" / "manifest.json").exists()

    run(project, "latent-action", "export", "--model", str(lam / "export"))
    for t in tiers:
        f = Feature(project / "data" / "features" / "latent_actions" / t)
        tier = Tier(project / "data" / "tiers" / t)
        assert f.tier_hash == tier.content_hash and f.verify() == []
        for rec in tier.index:
            z = f.get(rec["id"], "latent_actions")
            assert z.shape == (rec["frames"] - 1, 14) and z.dtype == np.float32 and np.isfinite(z).all()

    run(project, "train", "--stage", "2", "--nproc", "2", "--run-dir", "runs/s2", "--no-track")
    assert sorted(losses(project / "runs" / "s2")) == list(range(1, 9))
    assert (project / "runs" / "s2" / "export" / "model.safetensors").exists()


def lam_losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "lam/train/loss" in rec:
            out[rec["step"]] = rec["lam/train/loss"]
    return out


def test_latent_action_job_killed_then_resumed_matches_and_refuses_another_precision(project):
    """Runs after the test above (same module project: flow features and the uninterrupted bf16 run exist)."""
    straight = lam_losses(project / "runs" / "lam")
    run_dir = project / "runs" / "lam-killed"
    cmd = [str(MOTUS), "latent-action", "train", "--nproc", "2", "--run-dir", str(run_dir), "--precision", "bf16"]
    proc = subprocess.Popen(cmd, cwd=project, env=env_for(project), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-000006").exists():
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "step-000012").exists(), "finished before the kill landed"
    run(project, "latent-action", "train", "--nproc", "2", "--run-dir", str(run_dir), "--precision", "bf16")
    resumed = lam_losses(run_dir)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(7, 13):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])

    r = subprocess.run([*cmd[:-1], "fp32"], cwd=project, env=env_for(project), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "written with precision bf16; this job runs fp32" in r.stdout + r.stderr


def test_r2_and_probe_on_known_data():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 14))
    a = z @ rng.normal(size=(14, 14)) + 0.01 * rng.normal(size=(400, 14))
    assert linear_probe_r2(z[:300], a[:300], z[300:], a[300:]) > 0.99
    noise = rng.normal(size=(400, 14))
    assert linear_probe_r2(noise[:300], a[:300], noise[300:], a[300:]) < 0.1
    assert r2_score(a, a) == pytest.approx(1.0)


# Meta-World's actions are end-effector xyz deltas + gripper: motion a top-down flow image shows directly (ALOHA's
# 14 joint deltas from a 64x64 top camera are not linearly readable from 16x16 flow; see the README).
PROBE_TASKS = ["reach", "push", "pick-place", "door-open", "drawer-open", "button-press", "coffee-push",
               "sweep-into", "handle-press", "drawer-close", "window-open", "plate-slide"]
# Measured with this recipe, seed 0: this test 0.13 -> 0.30; the same job in-process 0.13 -> 0.34; standalone
# loops of the same model and loss, seeds 0/1/2: 0.17 -> 0.36, 0.12 -> 0.35, 0.17 -> 0.36 (margins 0.17-0.23).
# The thresholds sit ~0.05 under the weakest measurement.
PROBE_MARGIN, PROBE_FLOOR = 0.12, 0.25


@pytest.fixture(scope="module")
def sawyer_project(tmp_path_factory):
    """A project whose latent-action tiers are one labelled Meta-World tier (4-d native actions)."""
    raw = shipped_params()
    raw["data"]["heldout_fraction"] = 0.25
    raw["tiers"]["mw-probe"] = {
        "level": 3, "embodiment": "sawyer", "description": "Meta-World experts for the latent-action probe.",
        "action_dim": 4, "source": {"kind": "simulator", "options": {
            "sim": "metaworld", "tasks": PROBE_TASKS, "episodes_per_task": 6, "seed": 300}}}
    raw["latent_action"].update(tiers=["mw-probe"], steps=600, batch_size=32, lr=3e-4, labelled_fraction=1.0,
                                warmup_steps=10, checkpoint_every=600, validate_every=600)
    raw["latent_action"]["flow"].update(image_size=16, max_magnitude=0.1)
    return write_project(tmp_path_factory.mktemp("lam-probe"), raw, ingest=["mw-probe"])


def test_trained_latent_beats_untrained_on_held_out_episodes(sawyer_project, monkeypatch):
    """The done-when criterion: seeded, on real simulator flow, probe R^2 (latent -> real action, fitted on train
    episodes, scored on held-out ones) of the trained VAE vs the same probe on an untrained VAE of the same seed
    and architecture."""
    import torch

    from motus.data.flow_pairs import FlowPairs
    from motus.model.latent_action import LatentActionVAE, build_latent_action_config
    from motus.train.latent_action import quality

    proj = sawyer_project
    run(proj, "latent-action", "flow")
    run(proj, "latent-action", "train", "--nproc", "1", "--run-dir", "runs/lam")
    lam = proj / "runs" / "lam"
    rows = [json.loads(x) for x in (lam / "metrics.jsonl").read_text().splitlines()]
    recon = [m["lam/train/recon_loss"] for m in rows if "lam/train/recon_loss" in m]
    align = [m["lam/train/action_loss"] for m in rows if "lam/train/action_loss" in m]
    assert np.mean(recon[-20:]) < 0.5 * np.mean(recon[:20])  # reconstruction loss falls
    assert np.mean(align[-50:]) < np.mean(align[:50])  # and so does the alignment loss

    monkeypatch.chdir(proj)  # data.root is relative to the project
    params = load_params(proj / "params.yaml")
    train = FlowPairs(params, ["mw-probe"], "train", 14)
    held = FlowPairs(params, ["mw-probe"], "heldout", 14)
    assert set(train.by_embodiment) == set(held.by_embodiment) == {"sawyer"}
    assert not ({e for _, e, _ in held.labelled} & {e for _, e, _ in train.labelled})  # held-out episodes
    torch.manual_seed(params.project.seed)  # what the job does before building its VAE
    untrained = LatentActionVAE(build_latent_action_config("tiny", {"image_size": 16}))
    before = quality(untrained, train, held, seed=params.project.seed)["lam/probe_r2/sawyer"]
    after = quality(LatentActionVAE.from_pretrained(lam / "export"), train, held,
                    seed=params.project.seed)["lam/probe_r2/sawyer"]
    print(f"probe R^2 held-out: untrained {before:.3f}, trained {after:.3f}")
    assert after >= before + PROBE_MARGIN, (before, after)
    assert after >= PROBE_FLOOR, (before, after)
