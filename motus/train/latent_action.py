"""The latent-action VAE job: optical-flow features -> the VAE (DeepSpeed, checkpoints, MLflow) -> export.

The VAE trains on unlabelled flow + labelled flow (labelled_fraction) aligned with the real action of that
step on its embodiment's native dims (ALOHA 14, Meta-World 4 of the 14). Computing the flow features before,
the flow pairs a batch is drawn from (`motus.data.flow_pairs`) and the latent actions after are data work.
Batches are a pure function of (seed, step, rank), like the stage jobs, so resume is exact.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import config_hash
from ..contracts import LATENT_ACTION_JOB, LineageRecord, TierRef
from ..data.flow_pairs import FlowPairs
from ..data.latent_actions import lam_tiers
from ..data.versioning import locked_hash
from ..model.latent_action import LatentActionVAE, build_latent_action_config
from .distributed import JobContext, init_distributed
from .engine import deepspeed_config
from .precision import autocast
from .precision import resolve as resolve_precision
from .precision import setting_for as precision_setting
from .tracking import Tracker
from .trainer import Cadence, Trainer, TrainModule

log = logging.getLogger("motus.latent_action")


# -------------------------------------------------------------------------------------------- quality

def r2_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Variance-weighted R^2: 1 - (squared error summed over dims) / (variance summed over dims). A mean of
    per-dim R^2 lets a dim that barely moves in the held-out episodes (a gripper held shut) dominate the score."""
    ss_tot = float(((target - target.mean(0)) ** 2).sum())
    ss_res = float(((target - pred) ** 2).sum())
    return 1 - ss_res / ss_tot if ss_tot > 1e-8 else float("nan")


def linear_probe_r2(z_train: np.ndarray, a_train: np.ndarray, z_test: np.ndarray, a_test: np.ndarray,
                    ridge: float = 1e-3) -> float:
    """Ridge regression latent -> real action fitted on train, R^2 on test. Latents are standardised with the
    train statistics first, so the ridge penalty means the same whatever the latent's scale."""
    mean, std = z_train.mean(0), z_train.std(0) + 1e-8
    zt, zs = (z_train - mean) / std, (z_test - mean) / std
    x = np.concatenate([zt, np.ones((len(zt), 1))], 1)
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ a_train)
    return r2_score(np.concatenate([zs, np.ones((len(zs), 1))], 1) @ w, a_test)


def _to_input(imgs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def quality(vae: LatentActionVAE, train: FlowPairs, held: FlowPairs, n: int = 256, seed: int = 0) -> dict[str, float]:
    """Per embodiment with labels in both splits: probe R^2 of a linear map latent -> real action target on that
    embodiment's native dims, fitted on train pairs, scored on held-out episodes (`lam/probe_r2/<embodiment>`);
    `lam/probe_r2` is their mean. Plus flow reconstruction PSNR on held-out pairs."""
    vae.eval()
    device = next(vae.parameters()).device  # the job's device (CUDA under a GPU job); the pairs are host arrays
    out: dict[str, float] = {}

    def labelled(pairs: FlowPairs, emb: str, count: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, salt])
        imgs, acts = [], []
        for _ in range(count):
            img, a, m = pairs.pick(rng, True, emb)
            imgs.append(img)
            acts.append(a[m])
        return vae.latent(_to_input(imgs).to(device)).float().cpu().numpy(), np.stack(acts)

    scores = []
    for emb in sorted(set(train.by_embodiment) & set(held.by_embodiment)):
        zt, at = labelled(train, emb, 4 * n, 1)
        zh, ah = labelled(held, emb, 2 * n, 2)
        out[f"lam/probe_r2/{emb}"] = linear_probe_r2(zt, at, zh, ah)
        scores.append(out[f"lam/probe_r2/{emb}"])
    if scores:
        out["lam/probe_r2"] = float(np.mean(scores))
    rng = np.random.default_rng([seed, 3])
    x = _to_input([held.pick(rng, False)[0] for _ in range(min(n, 64))]).to(device)
    recon = vae.decode(vae.latent(x)).float().clamp(-1, 1)
    mse = float(((recon - x) / 2).pow(2).mean())  # in [0, 1] pixel units
    out["lam/recon_psnr"] = 10 * math.log10(1.0 / max(mse, 1e-10))
    return out


# ------------------------------------------------------------------------------------------------- job

class LatentActionJob(TrainModule):
    """The latent-action VAE train module: flow pairs of its tiers in, a VAE whose latent predicts the action."""

    name = "latent-action"
    reported = ("loss", "recon_loss", "action_loss", "kl")
    plotted = ("recon_loss", "action_loss")
    loss_curve = "lam_loss_curve.png"

    def __init__(self, params: Any, run_dir: Path, ctx: JobContext, tracker: Tracker | None = None,
                 max_steps: int | None = None, precision: str | None = None, code: dict[str, Any] | None = None):
        self.la = la = params.latent_action
        setting, source = precision_setting(params, la, precision, "latent_action")
        super().__init__(params, run_dir, ctx, tracker, precision=resolve_precision(setting, ctx.device, source=source),
                         cadence=Cadence(la.steps, la.batch_size, la.validate_every, la.checkpoint_every),
                         config_hash=config_hash(params), max_steps=max_steps, code=code)

    def build(self) -> None:
        la = self.la
        cfg = build_latent_action_config(la.preset, {"lambda_action": la.lambda_action, "beta_kl": la.beta_kl,
                                                     "image_size": la.flow.image_size})
        torch.manual_seed(self.seed)
        self.model = LatentActionVAE(cfg, weights=str(la.weights) if la.weights else None)
        self.tiers = lam_tiers(self.params)
        self.train_pairs = FlowPairs(self.params, self.tiers, "train", cfg.latent_dim, la.action_target)
        self.held_pairs = FlowPairs(self.params, self.tiers, "heldout", cfg.latent_dim, la.action_target)
        # the baseline a gate compares with: the same probe and reconstruction on the VAE as initialised (same
        # seed, same pairs), logged beside every validation; a resumed job computes it again, identically
        self.untrained: dict[str, float] = {}
        if self.ctx.rank == 0:
            self.untrained = {f"lam/untrained_{k[4:]}": v for k, v in
                              quality(self.model, self.train_pairs, self.held_pairs, seed=self.seed).items()}
            self.model.train()

    def optimizer(self):
        la = self.la
        opt = torch.optim.AdamW(self.model.parameters(), lr=la.lr, betas=(0.9, 0.95), weight_decay=la.weight_decay)
        warm = la.warmup_steps
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)

    def ds_config(self) -> dict[str, Any]:
        la = self.la
        return deepspeed_config("latent_action", batch_size=la.batch_size, world=self.ctx.world,
                                grad_clip=la.grad_clip, zero_stage=la.zero_stage)

    def log_start(self, engine: Any, resumed_from: Path | None) -> None:
        la, tr = self.la, self.tracker
        tr.set_tags({"job": "latent-action", "config_hash": self.config_hash, "device": self.ctx.device_type,
                     "precision": self.precision, "registered_model": la.registered_model})
        if resumed_from is None:
            tr.log_params({"latent_action": la.model_dump(mode="json"), "tiers": self.tiers})
            for t in self.tiers:
                f = self.train_pairs.flows[t]
                tr.log_dataset(f"flow/{t}", f.content_hash, str(f.path.resolve()))

    def loss(self, engine: Any, step: int) -> dict[str, torch.Tensor]:
        la, ctx = self.la, self.ctx
        micro = la.batch_size // ctx.world
        first = step * la.batch_size + ctx.rank * micro
        b = self.train_pairs.batch(self.seed, list(range(first, first + micro)), la.labelled_fraction,
                                   self.model.config.latent_dim)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919 + ctx.rank)
        with autocast(self.precision, ctx.device):
            return engine(b["flow"].to(ctx.device), b["actions"].to(ctx.device), b["mask"].to(ctx.device),
                          generator=g)

    def step_metrics(self, engine: Any, optimizer: Any, step: int, vals: dict[str, float], dt: float,
                     elapsed: float) -> dict[str, float]:
        m = {f"lam/train/{k}": v for k, v in vals.items()}
        m.update({"lr": optimizer.param_groups[0]["lr"], "perf/step_time_s": dt})
        return m

    def validate(self, engine: Any, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.ctx.rank == 0:
            metrics = {**quality(engine.module, self.train_pairs, self.held_pairs, seed=self.seed), **self.untrained}
            engine.module.train()
            self.tracker.log_metrics(metrics, step)
            self.append_metrics(step, metrics)
        if self.ctx.world > 1:
            dist.barrier()
        return metrics

    def export(self, engine: Any, checkpoint: Path | None, hours: float, wall: float) -> Path:
        out = self.run_dir / "export"
        engine.module.save_pretrained(out)
        tiers = tuple(TierRef(name=t, level=tier.manifest.level, content_hash=tier.content_hash,
                              dvc_hash=locked_hash(tier.path)) for t, tier in sorted(self.train_pairs.tiers.items()))
        record = LineageRecord(
            job=LATENT_ACTION_JOB, registered_model=self.la.registered_model, config_hash=self.config_hash,
            tiers=tiers, run_id=self.tracker.run_id, checkpoint=str(checkpoint) if checkpoint else None,
            features={f"flow/{t}": self.train_pairs.flows[t].content_hash for t in self.tiers},
            device_hours=hours, precision=self.precision, device_type=self.ctx.device_type,
            code_commit=self.code.get("commit"), code_dirty=self.code.get("dirty"))
        self.tracker.log_artifact(record.write(out), "export")
        return out


def run_latent_action(params: Any, run_dir: Path, tracker: Tracker | None = None, max_steps: int | None = None,
                      precision: str | None = None, code: dict[str, Any] | None = None):
    ctx = init_distributed()
    try:
        r = Trainer(LatentActionJob(params, run_dir, ctx, tracker, max_steps, precision, code)).run()
        return {"steps": r.steps, "export": None if r.export_dir is None else str(r.export_dir),
                "wall_seconds": r.wall_seconds}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


