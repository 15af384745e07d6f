"""The stage train module: a stage of the Motus model (its data, its loss, its validation, its export), run by
the generic trainer (`motus.train.trainer`), which owns the engine, the loop, checkpoints and accounting.

Every process of a job runs `run_stage`; rank 0 alone reports to the tracker and writes the export. What a
step sees is a pure function of (seed, step, rank): the data stream position and the flow-matching noise.
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

from ..config import config_hash, resolved_dict
from ..contracts import (
    POLICY_MODES,
    STAGE_JOB,
    VIDEO_MODES,
    ActionSpace,
    LineageRecord,
    ServingContract,
    TierRef,
)
from ..data.encoded import FEATURE as ENCODED
from ..data.encoded import EncodedWindows, cache_key, miss_reason
from ..data.loader import MixedWindows, TierWindows, collate_windows, window_spec_from_params
from ..data.paths import ProjectPaths
from ..data.tier import Tier
from ..data.versioning import locked_hash
from ..model import MotusModel
from ..model.encoders import FrozenEncoders
from ..model.rectified_flow import window_action_mse
from .distributed import PEAK_FLOPS, JobContext, init_distributed, job_hours
from .engine import deepspeed_config
from .inputs import window_inputs
from .parent import check_parent_normalization, load_parent
from .precision import autocast
from .precision import resolve as resolve_precision
from .precision import setting_for as precision_setting
from .recipe import StageRecipe, check_ready, lr_lambda, model_config_for, recipe_from_params
from .tracking import Tracker
from .trainer import Cadence, Trainer, TrainModule, TrainResult

log = logging.getLogger("motus.train")

StageResult = TrainResult  # what run_stage returns (the stage's name is the job's)


# --------------------------------------------------------------------------------------------- the job

class StageJob(TrainModule):
    reported = ("loss", "video_loss", "action_loss")
    validates_at_start = True  # val/* at step 0 too: the pretrained (or parent) starting point
    plotted = ("loss", "video_loss", "action_loss")

    def __init__(self, params: Any, stage: str | int, run_dir: Path, ctx: JobContext, tracker: Tracker | None = None,
                 init_from: str | None = None, max_steps: int | None = None, precision: str | None = None,
                 code: dict[str, Any] | None = None):
        self.recipe: StageRecipe = recipe_from_params(params, stage)
        self.s = s = self.recipe.settings
        setting, source = precision_setting(params, s, precision, f"stages.{self.recipe.name}")
        super().__init__(params, run_dir, ctx, tracker, precision=resolve_precision(setting, ctx.device, source=source),
                         cadence=Cadence(s.steps, s.batch_size, s.validate_every, s.checkpoint_every, s.log_every,
                                         s.keep_checkpoints),
                         config_hash=config_hash(params), max_steps=max_steps, parent=init_from, code=code)
        self.name = self.recipe.name
        self.init_from = init_from
        self.data_root = Path(params.data.root)
        self.flops_per_step: float | None = None
        self._flops_counted = False
        self.normalization: dict[str, Any] = {}

    # -- building -----------------------------------------------------------------------------------------
    def build(self) -> None:
        check_ready(self.params, self.recipe, self.data_root)
        cfg = model_config_for(self.params, self.recipe)
        torch.manual_seed(self.seed)
        self.model = MotusModel(cfg, with_vlm=False, with_vae=False)
        self.model.set_trainable(self.recipe.trains)
        self.model.gradient_checkpointing = self.s.activation_checkpointing
        # frozen parts: same seed on every rank and every attempt -> identical random tiny bases
        self.encoders = FrozenEncoders.build(cfg, self.seed, self.ctx.device, with_vlm=self.recipe.uses_understanding)
        self.vae, self.text, self.vlm = self.encoders.vae, self.encoders.text, self.encoders.vlm
        self.cfg = cfg
        self._build_data()

    def _build_data(self) -> None:
        cfg, p = self.cfg, self.params
        spec = window_spec_from_params(p.data.window, cfg, cfg.action.action_dim, cfg.action.state_dim)
        self.tiers = {t: Tier(self.data_root / t) for t in self.recipe.tiers}
        latent = {t: None for t in self.tiers}
        if self.recipe.action_source == "latent":
            from ..data.latent_actions import LatentActionSource

            latent = {t: LatentActionSource(p, t) for t in self.tiers}
        self.latent_sources = {t: v for t, v in latent.items() if v is not None}
        encoded = self._encoded(spec)
        self.train_sets = {t: TierWindows(tier, spec, split="train", heldout_fraction=p.data.heldout_fraction,
                                          latent_actions=latent[t], encoded=encoded.get(t))
                           for t, tier in self.tiers.items()}
        self.heldout_sets = {t: TierWindows(tier, spec, split="heldout", heldout_fraction=p.data.heldout_fraction,
                                            latent_actions=latent[t], encoded=encoded.get(t))
                             for t, tier in self.tiers.items()}
        self.stream = MixedWindows(self.train_sets, self.recipe.tiers, seed=self.seed)
        self.normalization = {t: ds.normalization for t, ds in self.train_sets.items()}

    def _encoded(self, spec: Any) -> dict[str, EncodedWindows]:
        """The encoder caches of this job's tiers, where every tier has one computed as this job would encode
        live (a batch cannot mix cached and live windows); else none, each miss logged with its reason."""
        paths = ProjectPaths(Path("."), self.data_root)
        found, missed = {}, {}
        for t, tier in sorted(self.tiers.items()):
            where = paths.feature(ENCODED, t)
            # every shard's sha256 checked: one sequential read of what training would read at random anyway
            why = miss_reason(where, cache_key(tier, spec, self.cfg, self.encoders), verify=True)
            if why is None:
                found[t] = EncodedWindows(where, self.cfg.text_len)
            else:
                missed[t] = why
        for t, why in missed.items():
            log.info("%s: tier '%s' is encoded live: %s", self.name, t, why)
        if missed and found:
            log.info("%s: the caches of %s are not read either: one batch mixes every tier", self.name, sorted(found))
        self.encoded_from = {} if missed else {t: e.content_hash for t, e in found.items()}
        self.encoded_misses = missed
        return {} if missed else found

    def optimizer(self):
        video_lr = self.s.video_lr or self.s.lr
        groups = [
            {"name": "video", "params": [p for p in self.model.video.parameters() if p.requires_grad], "lr": video_lr},
            {"name": "experts", "params": [p for n in ("action", "understanding")
                                           for p in self.model.expert(n).parameters() if p.requires_grad],
             "lr": self.s.lr},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError(f"{self.recipe.name}: nothing to train (trains={self.recipe.trains})")
        opt = torch.optim.AdamW(groups, betas=tuple(self.s.betas), weight_decay=self.s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.s))
        return opt, sched

    def ds_config(self) -> dict[str, Any]:
        return deepspeed_config(f"stages.{self.recipe.name}", batch_size=self.s.batch_size, world=self.ctx.world,
                                grad_clip=self.s.grad_clip, zero_stage=self.s.zero_stage,
                                offload_optimizer=self.s.offload_optimizer,
                                pin_memory=self.ctx.device.type == "cuda")

    def before_engine(self, fresh: bool) -> None:
        if self.init_from and fresh:
            check_parent_normalization(self.init_from, self.normalization, keeps_action_io=not self.recipe.drops_action_io)
            report = load_parent(self.model, self.init_from, drop_action_io=self.recipe.drops_action_io)
            log.info("started from %s (%d tensors, %d action I/O tensors re-initialised)", self.init_from,
                     len(report["loaded"]), len(report["dropped"]))

    # -- one batch ----------------------------------------------------------------------------------------
    def _batch(self, step: int) -> dict[str, Any]:
        micro = self.s.batch_size // self.ctx.world
        first = step * self.s.batch_size + self.ctx.rank * micro
        return collate_windows([self.stream[first + j] for j in range(micro)], allow_missing_actions=self._lenient)

    @property
    def _lenient(self) -> bool:
        """Batches may mix items with and without actions/state when the stage reads neither from the tier:
        Stage 1 (no actions) and Stage 2 (latent actions for every item, no state in pretrain mode)."""
        return not self.recipe.uses_actions or self.cfg.action.encoder_mode == "pretrain"

    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return window_inputs(batch, cfg=self.cfg, vae=self.vae, text=self.text, vlm=self.vlm,
                             with_actions=self.recipe.uses_actions, device=self.ctx.device)

    def _noise(self, step: int, salt: int = 0) -> torch.Generator:
        return torch.Generator(device=self.ctx.device).manual_seed(
            (self.seed * 1_000_003 + step * 7919 + self.ctx.rank * 104_729 + salt) % (2**63))

    # -- one step -------------------------------------------------------------------------------------------
    def loss(self, engine: Any, step: int) -> dict[str, torch.Tensor]:
        inputs = self._inputs(self._batch(step))
        if not self._flops_counted:  # once per process: MFU is an estimate
            self.flops_per_step, self._flops_counted = self._count_flops(engine, inputs, step), True
        with autocast(self.precision, self.ctx.device):
            return engine.module.training_loss(**inputs, generator=self._noise(step))

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"normalization": self.normalization}

    # -- reporting ----------------------------------------------------------------------------------------
    def log_start(self, engine: Any, resumed_from: Path | None) -> None:
        tr, s = self.tracker, self.s
        resolved = resolved_dict(self.params)
        (self.run_dir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
        tr.set_tags({"encoder_cache": "read" if self.encoded_from else
                     "live: " + "; ".join(f"{t}: {why}" for t, why in self.encoded_misses.items())[:4000]})
        tr.set_tags({"stage": self.recipe.name, "stage.number": str(self.recipe.stage), "config_hash": self.config_hash,
                     "precision": self.precision,
                     "device": self.ctx.device_type, "world_size": str(self.ctx.world), "nodes": str(self.ctx.nodes),
                     "parent": str(self.init_from or ""), "registered_model": s.registered_model})
        if resumed_from is None:
            tr.log_params({"params": resolved, "job": {"stage": self.recipe.name, "world_size": self.ctx.world,
                                                       "device": self.ctx.device_type, "init_from": self.init_from,
                                                       "precision": self.precision}})
            tr.log_artifact(self.run_dir / "config.json", "config")
            for ref in self._tier_refs():
                tier = self.tiers[ref.name]
                tr.log_dataset(ref.name, ref.content_hash, str((self.data_root / ref.name).resolve()),
                               extra={"level": ref.level, "episodes": tier.manifest.episodes,
                                      "weight": ref.weight, "dvc_hash": ref.dvc_hash})
            for name, src in self.latent_sources.items():
                tr.log_dataset(f"latent_actions/{name}", src.feature.content_hash,
                               str(src.feature.path.resolve()), extra=src.feature.meta)
            for name, content in self.encoded_from.items():
                where = ProjectPaths(Path("."), self.data_root).feature(ENCODED, name)
                tr.log_dataset(f"encoded/{name}", content, str(where.resolve()))
        else:
            tr.set_tags({"resumed_from": str(resumed_from)})

    def _tier_refs(self) -> tuple[TierRef, ...]:
        """The tiers this job reads, by content hash (and DVC hash where the tier is versioned)."""
        return tuple(TierRef(name=n, level=t.manifest.level, content_hash=t.content_hash,
                             dvc_hash=locked_hash(t.path), weight=self.recipe.tiers[n])
                     for n, t in sorted(self.tiers.items()))

    def _count_flops(self, engine: Any, inputs: dict[str, Any], step: int) -> float | None:
        from torch.utils.flop_counter import FlopCounterMode

        try:
            with FlopCounterMode(display=False) as fc, torch.no_grad(), autocast(self.precision, self.ctx.device):
                engine.module.training_loss(**inputs, generator=self._noise(step, salt=1))
            return 3.0 * fc.get_total_flops()  # forward + backward ~ 3x forward
        except Exception:  # noqa: BLE001 - MFU is an estimate; never fail a job over it
            return None

    def _peak_flops(self) -> float:
        if self.ctx.device_type in PEAK_FLOPS:
            return PEAK_FLOPS[self.ctx.device_type]
        if not hasattr(self, "_measured_peak"):
            a = torch.randn(512, 512, device=self.ctx.device)
            t = time.perf_counter()
            for _ in range(10):
                a @ a
            self._measured_peak = 2 * 512**3 * 10 / (time.perf_counter() - t)
        return self._measured_peak

    def step_metrics(self, engine: Any, optimizer: Any, step: int, vals: dict[str, float], dt: float,
                     elapsed: float) -> dict[str, float]:
        m = {f"train/{k}": v for k, v in vals.items()}
        for g in optimizer.param_groups:
            m[f"lr/{g.get('name', 'group')}"] = g["lr"]
        gn = engine.get_global_grad_norm()
        if gn is not None:
            m["train/grad_norm"] = float(gn)
        m["perf/step_time_s"] = dt
        m["perf/samples_per_s"] = self.s.batch_size / dt
        if self.flops_per_step:
            m["perf/mfu"] = self.flops_per_step / dt / self._peak_flops()  # per-process FLOPs over one device's peak
        m["cost/device_hours"] = job_hours(self.ctx, elapsed)
        log.info("step %d loss %.4f (%.2fs)", step, vals["loss"], dt)
        return m

    # -- validation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, engine: Any, step: int) -> dict[str, float]:
        """Held-out windows (`validation.windows`, spread over the tiers), every sampled number averaged over
        `validation.draws` seeded noise draws: the flow loss per modality at fixed t; VLA action MSE beside its
        zero-action floor, the untrained-sampler level (1 + floor) and the deterministic x0 estimate; the world
        model's (or Stage 1's video generation's) future-frame MSE / PSNR, sampled and x0."""
        if self.ctx.rank != 0:
            if self.ctx.world > 1:
                dist.barrier()
            return {}
        model = engine.module
        was_training = model.training
        model.eval()
        items = self._validation_items()
        metrics: dict[str, float] = {}
        if items:
            acc: dict[str, list[float]] = {}
            size = max(1, min(self.s.batch_size, 8))
            for b in range(0, len(items), size):
                chunk = items[b:b + size]
                inputs = self._inputs(collate_windows([w for _, w in chunk], allow_missing_actions=self._lenient))
                dims = [self.normalization[t].get("action_dim") for t, _ in chunk]
                for key, values in self._window_metrics(model, inputs, dims, step, first=b == 0).items():
                    acc.setdefault(key, []).extend(float(v) for v in values)
            metrics = {f"val/{k}": float(np.mean(v)) for k, v in acc.items()}
            for key in ("wm_video_mse", "wm_video_mse_x0"):
                if f"val/{key}" in metrics:
                    metrics[f"val/{key.replace('mse', 'psnr')}"] = 10 * math.log10(1.0 / max(metrics[f"val/{key}"], 1e-10))
            if "val/floor_zero_action_mse" in metrics:  # an untrained sampler returns its N(0, 1) noise
                metrics["val/untrained_action_mse"] = 1.0 + metrics["val/floor_zero_action_mse"]
            metrics["val/windows"] = float(len(items))
            metrics["val/draws"] = float(self.s.validation.draws)
            self.tracker.log_metrics(metrics, step)
        model.train(was_training)
        if self.ctx.world > 1:
            dist.barrier()
        return metrics

    def _validation_items(self) -> list[tuple[str, dict[str, Any]]]:
        """(tier, window) pairs, the same at every validation: `validation.windows` split evenly over the tiers
        (a tier with fewer held-out windows gives all it has) and evenly spaced through each tier's held-out
        windows, so every held-out episode is seen. Decoded once and kept: validation never waits on video."""
        if getattr(self, "_val_items", None) is None:
            sets = [(t, ds) for t, ds in sorted(self.heldout_sets.items()) if len(ds)]
            want, items = self.s.validation.windows, []
            for i, (t, ds) in enumerate(sets):
                share = want // len(sets) + (1 if i < want % len(sets) else 0)
                idx = np.unique(np.linspace(0, len(ds) - 1, min(share, len(ds))).round().astype(int))
                items += [(t, ds[int(j)]) for j in idx]
            if len(items) < want:
                log.warning("%s: validating on %d held-out windows, fewer than validation.windows=%d (held-out "
                            "episodes are too few or too short)", self.name, len(items), want)
            self._val_items = items
        return self._val_items

    def _window_metrics(self, model: MotusModel, inputs: dict[str, Any], dims: list[int | None], step: int,
                        first: bool) -> dict[str, list[float]]:
        """Per-window values for one batch, each averaged over the noise draws."""
        out: dict[str, list[torch.Tensor]] = {}
        add = lambda k, v: out.setdefault(k, []).append(v.detach().float().cpu())  # noqa: E731
        common = dict(video_latents=inputs["video_latents"], text_embeds=inputs["text_embeds"],
                      state=inputs.get("state"), understanding=inputs.get("understanding"))
        actions = inputs.get("actions") if self.recipe.uses_actions else None
        real = (self.vae.decode(inputs["video_latents"]) + 1) / 2
        future_mse = lambda lat: (((self.vae.decode(lat.float()) + 1) / 2 - real)[:, :, 1:] ** 2).flatten(1).mean(1)  # noqa: E731
        for d in range(self.s.validation.draws):
            gen = lambda salt, d=d: self._noise(d, salt=salt)  # noqa: E731 - same draws at every validation
            with autocast(self.precision, self.ctx.device):  # the model as it trains: same precision
                for t in (0.25, 0.5, 0.75):
                    losses = model.training_loss(inputs["video_latents"], inputs["text_embeds"], actions,
                                                 inputs.get("state"), inputs.get("understanding"),
                                                 generator=gen(int(t * 100)), t=t, reduction="none")
                    for kind in ("video", "action"):
                        if f"{kind}_loss" in losses:
                            add(f"{kind}_loss_t{t}", losses[f"{kind}_loss"])
                            add(f"{kind}_loss", losses[f"{kind}_loss"] / 3)
                if actions is not None:
                    vla = model.sample("vla", **common, generator=gen(7))
                    add("vla_action_mse", window_action_mse(vla.actions, actions, dims))
                    wm = model.sample("wm", **common, actions=actions, generator=gen(8))
                else:
                    wm = model.sample("vgm", **dict(common, state=None), generator=gen(8), action_stream=False)
            add("wm_video_mse", future_mse(wm.video_latents))
            if first and d == 0:
                self._frame_grid((self.vae.decode(wm.video_latents.float()) + 1) / 2, real, step)
        with autocast(self.precision, self.ctx.device):
            if actions is not None:
                vla0 = model.estimate_x0("vla", **common)
                wm0 = model.estimate_x0("wm", **common, actions=actions)
            else:
                wm0 = model.estimate_x0("vgm", **dict(common, state=None), action_stream=False)
        # each key got one entry per draw (`*_loss`: one per fixed t and draw, already divided by the 3 t's)
        per_window = {k: torch.stack(v).sum(0) / self.s.validation.draws for k, v in out.items()}
        if actions is not None:
            per_window["vla_action_mse_x0"] = window_action_mse(vla0.actions, actions, dims)
            per_window["floor_zero_action_mse"] = window_action_mse(torch.zeros_like(actions), actions, dims)
        per_window["wm_video_mse_x0"] = future_mse(wm0.video_latents)
        return {k: v.float().cpu().numpy() for k, v in per_window.items()}

    def _frame_grid(self, pred: torch.Tensor, real: torch.Tensor, step: int) -> None:
        """Rows: real / predicted future frames of the first held-out window."""
        to_img = lambda x: (x.clamp(0, 1) * 255).byte().permute(1, 2, 3, 0).cpu().numpy()  # noqa: E731
        r, p = to_img(real[0]), to_img(pred[0])
        grid = np.concatenate([np.concatenate(list(r), axis=1), np.concatenate(list(p), axis=1)], axis=0)
        self.tracker.log_image(grid, f"validation/frames_step{step:06d}.png")

    # -- export -------------------------------------------------------------------------------------------
    def export(self, engine: Any, checkpoint: Path | None, hours: float, wall: float) -> Path | None:
        """Model-only export (`save_pretrained` layout) + lineage facts: what the registry will hold."""
        out = self.run_dir / "export"
        model = engine.module
        # tiny random bases have no path to come back from: ship them with the export
        model.vae = self.vae
        model.vlm = self.vlm
        try:
            model.save_pretrained(out)
        finally:
            model.vae = model.vlm = None
        if self.text.weights is None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.text.state_dict().items()}, str(out / "text.safetensors"))
        features = {f"latent_actions/{n}": src.feature.content_hash
                    for n, src in self.latent_sources.items()}
        record = LineageRecord(
            job=STAGE_JOB, registered_model=self.s.registered_model, config_hash=self.config_hash,
            tiers=self._tier_refs(), run_id=self.tracker.run_id, stage=self.recipe.name,
            stage_number=self.recipe.stage, parent=self.init_from,
            checkpoint=str(checkpoint) if checkpoint else None, features=features, normalization=self.normalization,
            device_hours=hours, wall_seconds=wall, precision=self.precision, device_type=self.ctx.device_type,
            code_commit=self.code.get("commit"), code_dirty=self.code.get("dirty"))
        self.tracker.log_artifact(record.write(out), "export")
        serving = self.serving_contract()
        if serving is not None:
            self.tracker.log_artifact(serving.write(out), "export")
        if checkpoint is not None and (checkpoint / "manifest.json").exists():
            self.tracker.log_artifact(checkpoint / "manifest.json", "checkpoint")
        return out


    def serving_contract(self) -> ServingContract | None:
        """How a deployment feeds this model and reads what it answers: a policy (Stage 3, real actions) acts in
        each tier's robot units; a video model (Stage 1) imagines the future frames of each tier's camera. None
        for Stage 2, whose actions are latent: they are in no robot's units."""
        policy = self.recipe.action_source == "real" and self.cfg.action.encoder_mode == "finetune"
        if not policy and self.recipe.action_source != "none":
            return None
        spaces = []
        for t, ds in sorted(self.train_sets.items()):
            m = self.tiers[t].manifest
            views = dict(m.views)
            size = views.get(ds.view) or [self.cfg.height, self.cfg.width]
            composed = (m.source.get("options") or {}).get("compose_three_view") if m.source else None
            table = self.tiers[t].table
            first = next(iter(table.instructions(0)), "") if len(table.ids) else ""
            spaces.append(ActionSpace(
                tier=t, embodiment=m.embodiment, view=ds.view, image_size=(int(size[0]), int(size[1])),
                state_dim=int(m.state_dim or self.cfg.action.state_dim) if policy else 0,
                action_dim=int(m.action_dim or 0) if policy else 0,
                action_names=tuple(m.action_names) if m.action_names and policy else None,
                source_views=tuple(composed or ()), instruction=first))
        return ServingContract(registered_model=self.s.registered_model, stage_number=self.recipe.stage,
                               modes=POLICY_MODES if policy else VIDEO_MODES, chunk=self.cfg.action.chunk,
                               hold=next(iter(self.train_sets.values())).spec.downsample,  # one spec for all
                               spaces=tuple(spaces))


def run_stage(params: Any, stage: str | int, run_dir: Path, tracker: Tracker | None = None,
              init_from: str | None = None, max_steps: int | None = None, precision: str | None = None,
              code: dict[str, Any] | None = None) -> StageResult:
    ctx = init_distributed()
    try:
        return Trainer(StageJob(params, stage, run_dir, ctx, tracker, init_from, max_steps, precision, code)).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


