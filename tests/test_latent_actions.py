"""Latent actions end to end: flow features -> the VAE job (DeepSpeed, 2 processes) -> export -> Stage 2."""

import json
import subprocess

import numpy as np
import pytest
import yaml

from motus.config import load_params
from motus.data.features import Feature
from motus.data.tier import Tier
from motus.train.latent_action import linear_probe_r2, r2_score

from .test_train import MOTUS, env_for, losses, project  # noqa: F401 - the shared project fixture

pytestmark = pytest.mark.slow


def run(proj, *args):
    r = subprocess.run([str(MOTUS), *args], cwd=proj, env=env_for(proj), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"motus {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def test_flow_train_export_then_stage2(project):  # noqa: F811 - the fixture imported above
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["latent_action"].update(steps=12, batch_size=16, checkpoint_every=6, validate_every=12)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(project / "params.yaml")
    tiers = list(params.stages["stage2"].tiers)

    run(project, "latent-action", "flow")
    run(project, "latent-action", "train", "--nproc", "2", "--run-dir", "runs/lam")
    lam = project / "runs" / "lam"
    recon = [json.loads(x)["lam/train/recon_loss"] for x in (lam / "metrics.jsonl").read_text().splitlines()
             if "lam/train/recon_loss" in x]
    assert np.mean(recon[-3:]) < np.mean(recon[:3])  # reconstruction loss falls
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


def test_r2_and_probe_on_known_data():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 14))
    a = z @ rng.normal(size=(14, 14)) + 0.01 * rng.normal(size=(400, 14))
    assert linear_probe_r2(z[:300], a[:300], z[300:], a[300:]) > 0.99
    noise = rng.normal(size=(400, 14))
    assert linear_probe_r2(noise[:300], a[:300], noise[300:], a[300:]) < 0.1
    assert r2_score(a, a) == pytest.approx(1.0)
