"""The latent-action VAE job: optical-flow features -> the VAE (DeepSpeed, checkpoints, MLflow) -> export.

The VAE trains on unlabelled flow + labelled flow (labelled_fraction) aligned with the real action of that
step on its embodiment's native dims (ALOHA 14, Meta-World 4 of the 14). Computing the flow features before
and the latent actions after are data work (`motus.data.latent_actions`).
Batches are a pure function of (seed, step, rank), like the stage jobs, so resume is exact.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import config_hash
from ..contracts import LATENT_ACTION_JOB, LineageRecord, TierRef
from ..data.features import Feature, feature_dir
from ..data.latent_actions import FLOW, features_root, lam_tiers
from ..data.loader import split_episodes
from ..data.tier import Tier
from ..data.versioning import locked_hash
from ..model.latent_action import LatentActionVAE, build_latent_action_config
from .checkpoint import save_checkpoint
from .distributed import JobContext, accounting, init_distributed, mean_across_ranks
from .engine import deepspeed_config, resume_latest
from .precision import autocast
from .precision import resolve as resolve_precision
from .precision import setting_for as precision_setting
from .tracking import NullTracker, Tracker

log = logging.getLogger("motus.latent_action")


# ----------------------------------------------------------------------------------------------- data

def actions_are_positions(actions: np.ndarray, state: np.ndarray | None) -> bool:
    """True when actions are position targets (ALOHA's joint targets: a[t] ~ state[t+1]), False when they are
    already per-step motion commands (Meta-World's end-effector xyz delta). Decided from the data: a position
    target lands within half a state standard deviation of the next state on most dims; a motion command does not."""
    d = actions.shape[1]
    if state is None or state.shape[1] < d or len(actions) < 3:
        return False
    s = state[:, :d]
    err = np.abs(actions[:-1] - s[1:]).mean(0)
    spread = s.std(0) + 1e-6
    return bool(np.median(err / spread) < 0.5)


class FlowPairs:
    """All (tier, episode, t) flow images of the chosen tiers and split. An episode is labelled when its tier has
    actions of at most `latent_dim` native dims: the target is its normalised action on those dims (a mask marks
    them), so Meta-World's 4-d xyz delta + gripper labels latent dims 0-3 and ALOHA's 14-d joints label all 14.

    target "delta": what the flow between frames t and t+1 shows, i.e. the step's motion: the change of a position
    target (ALOHA joints), or the action itself when it already is a motion command (Meta-World). "absolute":
    the raw action. Targets are normalised per (tier, embodiment) with that group's statistics over the tier."""

    def __init__(self, params: Any, tiers: list[str], split: str, latent_dim: int, target: str = "delta"):
        self.params, self.split, self.target, self.latent_dim = params, split, target, latent_dim
        root = Path(params.data.root)
        self.flows = {t: Feature(feature_dir(features_root(params), FLOW, t)) for t in tiers}
        self.tiers = {t: Tier(root / t) for t in tiers}
        self.items: list[tuple[str, str, int]] = []  # (tier, episode, count)
        self.labelled: list[tuple[str, str, int]] = []
        self.groups: dict[tuple[str, str], dict[str, Any]] = {}  # (tier, embodiment) -> dims, kind, mean, std
        self._group_of: dict[tuple[str, str], tuple[str, str]] = {}
        self.by_embodiment: dict[str, list[tuple[str, str, int]]] = {}
        for t, tier in self.tiers.items():
            train_ids, held = split_episodes(t, [r["id"] for r in tier.index], params.data.heldout_fraction)
            chosen = set(train_ids if split == "train" else held)
            if tier.manifest.action_dim:
                self._fit_groups(t, tier)
            for rec in tier.index:
                if rec["id"] not in chosen or rec["frames"] < 2:
                    continue
                entry = (t, rec["id"], rec["frames"] - 1)
                self.items.append(entry)
                g = self._group_of.get((t, rec["id"]))
                if g is not None:
                    self.labelled.append(entry)
                    self.by_embodiment.setdefault(g[1], []).append(entry)
        if not self.items:
            raise ValueError(f"no flow pairs in the {split} split of tiers {tiers}")
        self._cum = np.cumsum([0] + [n for _, _, n in self.items])
        self._lcum = np.cumsum([0] + [n for _, _, n in self.labelled])
        self._ecum = {e: np.cumsum([0] + [n for _, _, n in v]) for e, v in self.by_embodiment.items()}
        self._cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}

    def _raw_target(self, actions: np.ndarray, positions: bool) -> np.ndarray:
        """[T-1, d]: flow t sees the motion from frame t to t+1."""
        if self.target == "delta" and positions:
            return np.diff(actions, axis=0)
        return actions[:-1]

    def _fit_groups(self, t: str, tier: Tier) -> None:
        """Statistics per (tier, embodiment) over the whole tier (both splits: a unit, not a label)."""
        by: dict[str, list[tuple[str, np.ndarray, np.ndarray | None, int]]] = {}
        for rec in tier.index:
            native = rec.get("native_action_dim") or tier.manifest.action_dim
            if not native or native > self.latent_dim or rec["frames"] < 2:
                continue
            actions, state = tier.read_arrays(rec["id"])
            if actions is None:
                continue
            by.setdefault(rec.get("embodiment", "unknown"), []).append((rec["id"], actions[:, :native], state, native))
        for emb, eps in by.items():
            dims = eps[0][3]
            if any(n != dims for *_, n in eps):
                raise ValueError(f"tier '{t}': embodiment '{emb}' has episodes of different native action dims")
            positions = actions_are_positions(np.concatenate([a for _, a, _, _ in eps]),
                                              None if any(s is None for _, _, s, _ in eps)
                                              else np.concatenate([s for _, _, s, _ in eps]))
            d = np.concatenate([self._raw_target(a, positions) for _, a, _, _ in eps])
            self.groups[(t, emb)] = {"dims": dims, "positions": positions, "mean": d.mean(0).astype(np.float32),
                                     "std": np.maximum(d.std(0), 1e-6).astype(np.float32)}
            for eid, *_ in eps:
                self._group_of[(t, eid)] = (t, emb)

    def _episode(self, tier: str, eid: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        key = (tier, eid)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.pop(next(iter(self._cache)))
            flow = self.flows[tier].get(eid, FLOW)
            target = mask = None
            g = self._group_of.get(key)
            if g is not None:
                info = self.groups[g]
                n = info["dims"]
                raw, _ = self.tiers[tier].read_arrays(eid)
                norm = (self._raw_target(raw[:, :n], info["positions"]) - info["mean"]) / info["std"]
                target = np.zeros((len(norm), self.latent_dim), np.float32)
                target[:, :n] = norm
                mask = np.zeros(self.latent_dim, bool)
                mask[:n] = True
            self._cache[key] = (flow, target, mask)
        return self._cache[key]

    def pick(self, rng: np.random.Generator, labelled: bool, embodiment: str | None = None
             ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(flow image, normalised target [latent_dim] or None, labelled-dims mask [latent_dim] or None)."""
        if labelled and embodiment is not None:
            pool, cum = self.by_embodiment[embodiment], self._ecum[embodiment]
        elif labelled and self.labelled:
            pool, cum = self.labelled, self._lcum
        else:
            pool, cum = self.items, self._cum
        k = int(rng.integers(0, cum[-1]))
        i = int(np.searchsorted(cum, k, side="right") - 1)
        tier, eid, _ = pool[i]
        t = k - int(cum[i])
        flow, target, mask = self._episode(tier, eid)
        if labelled and target is not None:
            return flow[t], target[t], mask
        return flow[t], None, None

    def batch(self, seed: int, positions: list[int], fraction: float, latent_dim: int) -> dict[str, torch.Tensor]:
        imgs, acts, masks = [], [], []
        for pos in positions:
            rng = np.random.default_rng([seed, pos])
            labelled = bool(self.labelled) and rng.random() < fraction
            img, a, m = self.pick(rng, labelled)
            imgs.append(img)
            acts.append(a if a is not None else np.zeros(latent_dim, np.float32))
            masks.append(m if m is not None else np.zeros(latent_dim, bool))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return {"flow": x, "actions": torch.from_numpy(np.stack(acts)), "mask": torch.from_numpy(np.stack(masks))}


# -------------------------------------------------------------------------------------------- quality

def r2_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean R^2 over the target dims that vary."""
    ss_tot = ((target - target.mean(0)) ** 2).sum(0)
    ss_res = ((target - pred) ** 2).sum(0)
    keep = ss_tot > 1e-8
    return float(np.mean(1 - ss_res[keep] / ss_tot[keep])) if keep.any() else float("nan")


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
    out: dict[str, float] = {}

    def labelled(pairs: FlowPairs, emb: str, count: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, salt])
        imgs, acts = [], []
        for _ in range(count):
            img, a, m = pairs.pick(rng, True, emb)
            imgs.append(img)
            acts.append(a[m])
        return vae.latent(_to_input(imgs)).cpu().numpy(), np.stack(acts)

    scores = []
    for emb in sorted(set(train.by_embodiment) & set(held.by_embodiment)):
        zt, at = labelled(train, emb, 4 * n, 1)
        zh, ah = labelled(held, emb, 2 * n, 2)
        out[f"lam/probe_r2/{emb}"] = linear_probe_r2(zt, at, zh, ah)
        scores.append(out[f"lam/probe_r2/{emb}"])
    if scores:
        out["lam/probe_r2"] = float(np.mean(scores))
    rng = np.random.default_rng([seed, 3])
    x = _to_input([held.pick(rng, False)[0] for _ in range(min(n, 64))])
    recon = vae.decode(vae.latent(x)).clamp(-1, 1)
    mse = float(((recon - x) / 2).pow(2).mean())  # in [0, 1] pixel units
    out["lam/recon_psnr"] = 10 * math.log10(1.0 / max(mse, 1e-10))
    return out


# ------------------------------------------------------------------------------------------------- job

class LatentActionJob:
    def __init__(self, params: Any, run_dir: Path, ctx: JobContext, tracker: Tracker | None = None,
                 max_steps: int | None = None, precision: str | None = None, code: dict[str, Any] | None = None):
        self.code = dict(code or {})  # {commit, dirty} of the code that runs, from the launcher
        self.params, self.la, self.ctx = params, params.latent_action, ctx
        setting, source = precision_setting(params, self.la, precision, "latent_action")
        self.precision = resolve_precision(setting, ctx.device, source=source)
        self.run_dir = Path(run_dir)
        self.tracker = tracker if (tracker is not None and ctx.rank == 0) else NullTracker()
        self.max_steps, self.seed = max_steps, params.project.seed
        self.config_hash = config_hash(params)

    def build(self) -> None:
        import deepspeed

        la = self.la
        cfg = build_latent_action_config(la.preset, {"lambda_action": la.lambda_action, "beta_kl": la.beta_kl,
                                                     "image_size": la.flow.image_size})
        torch.manual_seed(self.seed)
        self.model = LatentActionVAE(cfg, weights=str(la.weights) if la.weights else None)
        self.tiers = lam_tiers(self.params)
        self.train_pairs = FlowPairs(self.params, self.tiers, "train", cfg.latent_dim, la.action_target)
        self.held_pairs = FlowPairs(self.params, self.tiers, "heldout", cfg.latent_dim, la.action_target)
        opt = torch.optim.AdamW(self.model.parameters(), lr=la.lr, betas=(0.9, 0.95), weight_decay=la.weight_decay)
        warm = la.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        ds = deepspeed_config("latent_action", batch_size=la.batch_size, world=self.ctx.world,
                              grad_clip=la.grad_clip, zero_stage=la.zero_stage)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=opt, lr_scheduler=sched, config=ds)
        resumed = resume_latest(self.engine, self.run_dir, precision=self.precision, config_hash=self.config_hash)
        self.resumed_from, self.start_step, self.wall_before = resumed.checkpoint, resumed.step, resumed.wall_seconds

    def run(self) -> dict[str, Any]:
        self.build()
        la, ctx, tr = self.la, self.ctx, self.tracker
        if ctx.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tr.set_tags({"job": "latent-action", "config_hash": self.config_hash, "device": ctx.device_type,
                         "precision": self.precision,
                         "registered_model": la.registered_model})
            if self.resumed_from is None:
                tr.log_params({"latent_action": la.model_dump(mode="json"), "tiers": self.tiers})
                for t in self.tiers:
                    f = self.train_pairs.flows[t]
                    tr.log_dataset(f"flow/{t}", f.content_hash, str(f.path.resolve()))
        micro = la.batch_size // ctx.world
        end = min(la.steps, self.max_steps or la.steps)
        t_start = time.perf_counter()
        history: dict[str, list[tuple[int, float]]] = {"recon_loss": [], "action_loss": []}
        last = self.resumed_from
        for step in range(self.start_step, end):
            t0 = time.perf_counter()
            first = step * la.batch_size + ctx.rank * micro
            b = self.train_pairs.batch(self.seed, list(range(first, first + micro)), la.labelled_fraction,
                                       self.model.config.latent_dim)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919 + ctx.rank)
            with autocast(self.precision, ctx.device):
                out = self.engine(b["flow"].to(ctx.device), b["actions"].to(ctx.device), b["mask"].to(ctx.device),
                                  generator=g)
            self.engine.backward(out["loss"])
            self.engine.step()
            vals = mean_across_ranks({k: float(out[k].detach()) for k in ("loss", "recon_loss", "action_loss", "kl")},
                                      ctx)
            done = step + 1
            history["recon_loss"].append((done, vals["recon_loss"]))
            history["action_loss"].append((done, vals["action_loss"]))
            if ctx.rank == 0:
                m = {f"lam/train/{k}": v for k, v in vals.items()}
                m.update({"lr": self.optimizer.param_groups[0]["lr"], "perf/step_time_s": time.perf_counter() - t0})
                tr.log_metrics(m, done)
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": done, **m}) + "\n")
            if done % la.validate_every == 0 or done == la.steps:
                self.validate(done)
            if done % la.checkpoint_every == 0 or done == la.steps:
                last = save_checkpoint(self.engine, self.run_dir / "checkpoints", done, stage="latent-action",
                                       data_position=done * la.batch_size, config_hash=self.config_hash,
                                       parent=None, wall_seconds=self.wall_before + time.perf_counter() - t_start,
                                       extra={"mlflow_run_id": tr.run_id, "precision": self.precision})
        wall = self.wall_before + time.perf_counter() - t_start
        result = {"steps": end, "export": None, "wall_seconds": wall}
        if ctx.rank == 0:
            tr.log_loss_curve({k: v for k, v in history.items() if v}, "lam_loss_curve.png")
            metrics, _ = accounting(ctx, wall, self.params)
            hours = metrics["cost/device_hours"]
            tr.log_metrics(metrics, end)
            if end == la.steps:
                result["export"] = str(self.export(last, hours))
        if ctx.world > 1:
            dist.barrier()
        return result

    def validate(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.ctx.rank == 0:
            metrics = quality(self.engine.module, self.train_pairs, self.held_pairs, seed=self.seed)
            self.engine.module.train()
            self.tracker.log_metrics(metrics, step)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.ctx.world > 1:
            dist.barrier()
        return metrics

    def export(self, checkpoint: Path | None, hours: float) -> Path:
        out = self.run_dir / "export"
        self.engine.module.save_pretrained(out)
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
        return LatentActionJob(params, run_dir, ctx, tracker, max_steps, precision, code).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


