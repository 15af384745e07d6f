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
    from motus.data.latent_actions import LatentActionSource

    for t in tiers:
        f = Feature(project / "data" / "features" / "latent_actions" / t)
        tier = Tier(project / "data" / "tiers" / t)
        assert f.tier_hash == tier.content_hash and f.verify() == []
        # flow over the window's stride (tiny geometry: an action every 3 frames): one latent per 3-frame step
        assert f.meta["stride"] == 3
        zs = []
        for rec in tier.index:
            z = f.get(rec["id"], "latent_actions")
            assert z.shape == (rec["frames"] - 3, 14) and z.dtype == np.float32 and np.isfinite(z).all()
            zs.append(z)
        # the manifest's standardisation is the tier's own per-dim mean / std, and Stage 2 reads unit-scale latents
        zs = np.concatenate(zs).astype(np.float64)
        np.testing.assert_allclose(f.meta["standardisation"]["mean"], zs.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f.meta["standardisation"]["std"], zs.std(0), rtol=1e-3, atol=1e-5)
        old = os.getcwd()
        os.chdir(project)
        try:
            source = LatentActionSource(load_params(project / "params.yaml"), t)
            z0 = np.concatenate([source.get(r["id"]) for r in tier.index])
        finally:
            os.chdir(old)
        np.testing.assert_allclose(z0.mean(0), 0, atol=1e-3)
        np.testing.assert_allclose(z0.std(0), 1, atol=1e-2)
    from motus.data.loader import TierWindows, WindowSpec

    other = WindowSpec(chunk=8, video_action_ratio=2, downsample=2, image_size=(64, 64))
    with pytest.raises(ValueError, match="latent actions from flow 3 frames apart, but the window takes an action "
                                         "every 2 frames"):
        TierWindows(tier, other, latent_actions=source)

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


# The probe project: both embodiments of the pyramid with enough episodes that a held-out R^2 means something (the
# demo's tiers hold out one or two episodes each), trained at the shipped labelled mix (10 %).
PROBE_TASKS = ["reach", "push", "pick-place", "door-open", "drawer-open", "button-press", "coffee-push",
               "sweep-into", "handle-press", "drawer-close", "window-open", "plate-slide"]
PROBE_STEPS, PROBE_FLOW = 1200, {"image_size": 16, "max_magnitude": 0.5}  # the shipped flow settings
# Measured with this recipe (flow over the window's stride 3, seed 0): held-out probe R^2 untrained -> trained,
# Meta-World 0.319 -> 0.396, ALOHA 0.077 -> 0.173. The floors sit a little under the measurement; ALOHA's is
# below the 0.3 (what it takes is open: more episodes helped; 32 px flow, 128 px renders, the wrist
# cameras composed in, max_magnitude 1.5 and lambda_action 10 did not: README, Latent actions).
PROBE_FLOOR = {"sawyer": 0.35, "aloha": 0.12}
PROBE_MARGIN = 0.05


@pytest.fixture(scope="module")
def probe_project(tmp_path_factory):
    """Meta-World experts (12 tasks x 6, 4-d native actions) and ALOHA random reaching (64 episodes, 14 joints)."""
    raw = shipped_params()
    raw["data"]["heldout_fraction"] = 0.25
    raw["tiers"] = {
        "mw-probe": {"level": 3, "embodiment": "sawyer", "description": "Meta-World experts for the probe.",
                     "action_dim": 4, "source": {"kind": "simulator", "options": {
                         "sim": "metaworld", "tasks": PROBE_TASKS, "episodes_per_task": 6, "seed": 300}}},
        "aloha-probe": {"level": 4, "embodiment": "aloha", "description": "ALOHA random reaching for the probe.",
                        "action_dim": 14, "source": {"kind": "simulator", "options": {
                            "sim": "aloha-random", "n": 64, "seed": 400}}}}
    for stage in raw["stages"].values():
        stage["tiers"] = {"mw-probe": 0.5, "aloha-probe": 0.5}
    raw["latent_action"].update(heldout_fraction=None,  # the project's quarter, as measured
                                tiers=None, steps=PROBE_STEPS, checkpoint_every=PROBE_STEPS,
                                validate_every=PROBE_STEPS)  # the shipped labelled_fraction, lr and batch
    raw["latent_action"]["flow"].update(PROBE_FLOW)
    return write_project(tmp_path_factory.mktemp("lam-probe"), raw)


def test_latent_actions_predict_the_real_actions_of_held_out_episodes_on_both_embodiments(probe_project, monkeypatch):
    """Seeded, on real simulator flow at the shipped 10 % labelled mix: the held-out probe R^2 (latent -> the motion
    of the real actions, fitted on train episodes, scored on held-out ones) per embodiment, trained vs an untrained
    VAE of the same seed and architecture."""
    import torch

    from motus.data.flow_pairs import FlowPairs
    from motus.model.latent_action import LatentActionVAE, build_latent_action_config
    from motus.train.latent_action import quality

    proj = probe_project
    run(proj, "latent-action", "flow")
    run(proj, "latent-action", "train", "--nproc", "1", "--run-dir", "runs/lam")
    lam = proj / "runs" / "lam"
    rows = [json.loads(x) for x in (lam / "metrics.jsonl").read_text().splitlines()]
    recon = [m["lam/train/recon_loss"] for m in rows if "lam/train/recon_loss" in m]
    assert np.mean(recon[-20:]) < 0.5 * np.mean(recon[:20])  # reconstruction loss falls

    monkeypatch.chdir(proj)  # data.root is relative to the project
    params = load_params(proj / "params.yaml")
    assert params.latent_action.labelled_fraction == 0.1  # the shipped mix
    tiers = ["mw-probe", "aloha-probe"]
    train, held = FlowPairs(params, tiers, "train", 14), FlowPairs(params, tiers, "heldout", 14)
    assert train.stride == 3  # the tiny window's downsample
    assert set(train.by_embodiment) == set(held.by_embodiment) == {"sawyer", "aloha"}
    assert not ({e for _, e, _ in held.labelled} & {e for _, e, _ in train.labelled})  # held-out episodes
    torch.manual_seed(params.project.seed)  # what the job does before building its VAE
    untrained = LatentActionVAE(build_latent_action_config("tiny", {"image_size": PROBE_FLOW["image_size"]}))
    before = quality(untrained, train, held, seed=params.project.seed)
    after = quality(LatentActionVAE.from_pretrained(lam / "export"), train, held, seed=params.project.seed)
    seen = {emb: (before[f"lam/probe_r2/{emb}"], after[f"lam/probe_r2/{emb}"]) for emb in PROBE_FLOOR}
    print(" ".join(f"{emb}: probe R^2 held-out untrained {b:.3f}, trained {a:.3f};" for emb, (b, a) in seen.items()))
    for emb, (b, a) in seen.items():
        assert a >= PROBE_FLOOR[emb] and a >= b + PROBE_MARGIN, (emb, seen)

    # the shipped gate of the VAE on what its job logged: the trained VAE passes, an untrained one (its numbers are
    # its own baseline) fails, saying against what
    from motus.track.gates import judge

    gate = params.gates[params.latent_action.registered_model]
    last = [m for m in rows if "lam/probe_r2" in m][-1]
    assert last["lam/untrained_probe_r2"] == pytest.approx(np.mean([b for b, _ in seen.values()]), abs=1e-6)
    assert judge("motus-lam", 1, gate, last, None, None).passed
    untrained = {**last, "lam/probe_r2": last["lam/untrained_probe_r2"],
                 "lam/recon_psnr": last["lam/untrained_recon_psnr"]}
    verdict = judge("motus-lam", 2, gate, untrained, None, None)
    assert not verdict.passed and len(verdict.failed_rules) == 2
    assert "is not >= 1 x lam/untrained_probe_r2" in verdict.failed_rules[0].reason
