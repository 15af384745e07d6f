"""Latent actions as data: the optical-flow feature of a tier, and the latent actions the latent-action VAE
assigns to every step of a tier's episodes (the Stage 2 model trains on these instead of real actions).

  flow     every frame pair `stride` apart -> an RGB optical-flow image (features/flow/<tier>); the stride is
           the training window's downsample: a Stage 2 window takes one action every `downsample` frames, so
           each latent must describe the motion over that many frames, not a third of it
  export   every Stage 2 tier -> `latent_actions` [T-stride, d] per episode (features/latent_actions/<tier>),
           with per-dim mean / std over the tier in the manifest; Stage 2's loader standardises with them
Training the VAE itself is a train module (`motus.train.latent_action`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.latent_action import LatentActionVAE
from .features import Feature, FeatureWriter, feature_dir
from .optical_flow import episode_flow_images, make_flow_model
from .paths import ProjectPaths
from .tier import Tier, export_hash

FLOW, LATENT = "flow", "latent_actions"


def features_root(params: Any) -> Path:
    return ProjectPaths.of(params).features


def lam_tiers(params: Any) -> list[str]:
    la = params.latent_action
    if la.tiers:
        return list(la.tiers)
    s2 = [s for s in params.stages.values() if s.action_source == "latent"]
    if not s2:
        raise ValueError("latent_action.tiers is null and no stage trains on latent actions: name the tiers")
    return list(s2[0].tiers)


# ------------------------------------------------------------------------------------------------ optical flow

def probe_heldout_fraction(params: Any) -> float:
    """Episodes of the VAE's tiers held out of its training (its probe is scored on them)."""
    la = params.latent_action.heldout_fraction
    return params.data.heldout_fraction if la is None else la


def flow_stride(params: Any) -> int:
    """`latent_action.flow.stride`, or the training window's downsample when it is None."""
    if params.latent_action.flow.stride is not None:
        return int(params.latent_action.flow.stride)
    if params.data.window.downsample is not None:
        return int(params.data.window.downsample)
    from ..model.presets import config_from_params

    return int(config_from_params(params.model).downsample)


def build_flow_feature(params: Any, tier_name: str, progress=None) -> dict[str, Any]:
    fs = params.latent_action.flow
    tier = Tier(Path(params.data.root) / tier_name)
    options = {"preset": fs.preset} if fs.model == "dis" else {"weights": fs.weights}
    model = make_flow_model(fs.model, **options)
    size = (fs.image_size, fs.image_size)
    stride = flow_stride(params)
    views = fs.views.get(tier_name)  # None: each episode's first view
    missing = [v for v in views or [] if v not in tier.manifest.views]
    if missing:
        raise ValueError(f"latent_action.flow.views.{tier_name}: tier '{tier_name}' has no view "
                         f"{', '.join(missing)} (it has {', '.join(tier.manifest.views) or 'none'})")
    writer = FeatureWriter(feature_dir(features_root(params), FLOW, tier_name), FLOW, tier_name, tier.content_hash,
                           compress=True, meta={"model": fs.model, "preset": fs.preset, "image_size": fs.image_size,
                                                "stride": stride, "max_magnitude": fs.max_magnitude,
                                                "views": views})
    for rec in tier.index:
        if rec["frames"] <= stride:
            raise ValueError(f"tier '{tier_name}' episode '{rec['id']}' has {rec['frames']} frames: no flow pair "
                             f"{stride} frames apart (latent_action.flow.stride / data.window.downsample)")
        # an episode without one of the views is an error naming it (read_episode), never a silent fallback
        ep = tier.read_episode(rec["id"], views=views)
        frames = [ep.frames[v] for v in views] if views else ep.frames[next(iter(ep.frames))]
        images, _meta = episode_flow_images(frames, model, size, fs.max_magnitude, stride)
        writer.add(rec["id"], {FLOW: images})
        if progress:
            progress()
    return writer.close()


# ---------------------------------------------------------------------------------------------- export

@torch.no_grad()
def export_latent_actions(params: Any, lam_export: Path, tier_name: str, batch: int = 256) -> dict[str, Any]:
    """`latent_actions` [T-stride, 14] for every episode of a tier: the VAE's mean latent of each flow image; the
    manifest keeps the flow's stride and the per-dim mean / std over the tier (`standardisation`), which Stage 2's
    loader applies: the VAE's latent scale is whatever its KL weight left it, the action expert wants unit scale."""
    vae = LatentActionVAE.from_pretrained(lam_export).eval()
    flows = Feature(feature_dir(features_root(params), FLOW, tier_name))
    tier = Tier(Path(params.data.root) / tier_name)
    if flows.tier_hash != tier.content_hash:
        raise ValueError(f"flow feature of '{tier_name}' was computed from another version of the tier "
                         f"({flows.tier_hash[:12]} != {tier.content_hash[:12]}): rebuild it (motus latent-action flow)")
    lam_hash = export_hash(lam_export)  # what the registry tags the VAE's version with
    stride = int(flows.meta.get("stride", 1))
    writer = FeatureWriter(feature_dir(features_root(params), LATENT, tier_name), LATENT, tier_name, tier.content_hash,
                           meta={"latent_action_model": str(lam_export), "latent_action_model_hash": lam_hash,
                                 "flow_feature_hash": flows.content_hash, "stride": stride})
    total, total_sq, count = 0.0, 0.0, 0
    for rec in tier.index:
        imgs = flows.get(rec["id"], FLOW)
        parts = []
        for i in range(0, len(imgs), batch):
            x = torch.from_numpy(imgs[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            parts.append(vae.latent(x).float().numpy())
        z = np.concatenate(parts).astype(np.float32)
        if z.shape != (rec["frames"] - stride, vae.config.latent_dim):
            raise ValueError(f"flow feature of '{tier_name}' episode '{rec['id']}' gives {z.shape[0]} latents for "
                             f"{rec['frames']} frames at stride {stride}: rebuild it (motus latent-action flow)")
        writer.add(rec["id"], {LATENT: z})
        z64 = z.astype(np.float64)
        total, total_sq, count = total + z64.sum(0), total_sq + (z64 ** 2).sum(0), count + len(z64)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean ** 2, 0.0))
    writer.meta["standardisation"] = {"mean": [float(v) for v in np.atleast_1d(mean)],
                                      "std": [float(max(v, 1e-6)) for v in np.atleast_1d(std)], "count": count}
    return writer.close()


class LatentActionSource:
    """What Stage 2's loader reads: `dim`, `stride` and `get(episode_id)` -> standardised latents [T-stride, d]."""

    def __init__(self, params: Any, tier_name: str):
        self.feature = Feature(feature_dir(features_root(params), LATENT, tier_name))
        arrays = self.feature.manifest.arrays
        shape = arrays.get(LATENT, {}).get("shape") or arrays.get(LATENT, {}).get("trailing_shape")
        self.dim = int(shape[-1]) if shape else int(self.feature.get(self.feature.episode_ids[0], LATENT).shape[1])
        meta = self.feature.meta
        self.stride = int(meta.get("stride", 1))
        std = meta.get("standardisation")
        if not std:
            raise ValueError(f"latent actions of '{tier_name}' ({self.feature.path}) carry no standardisation "
                             f"statistics (exported by an older version): re-export them (motus latent-action export)")
        self.mean = np.asarray(std["mean"], np.float32)
        self.std = np.asarray(std["std"], np.float32)

    def get(self, episode_id: str) -> np.ndarray:
        return (self.feature.get(episode_id, LATENT) - self.mean) / self.std
