"""Latent actions as data: the optical-flow feature of a tier, and the latent actions the latent-action VAE
assigns to every step of a tier's episodes (the Stage 2 model trains on these instead of real actions).

  flow     every frame pair of a tier -> an RGB optical-flow image (features/flow/<tier>)
  export   every Stage 2 tier -> `latent_actions` [T-1, d] per episode (features/latent_actions/<tier>)
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
from .tier import Tier, folder_hash

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

def build_flow_feature(params: Any, tier_name: str, progress=None) -> dict[str, Any]:
    fs = params.latent_action.flow
    tier = Tier(Path(params.data.root) / tier_name)
    options = {"preset": fs.preset} if fs.model == "dis" else {"weights": fs.weights}
    model = make_flow_model(fs.model, **options)
    size = (fs.image_size, fs.image_size)
    writer = FeatureWriter(feature_dir(features_root(params), FLOW, tier_name), FLOW, tier_name, tier.content_hash,
                           compress=True, meta={"model": fs.model, "preset": fs.preset, "image_size": fs.image_size,
                                                "stride": fs.stride, "max_magnitude": fs.max_magnitude})
    for rec in tier.index:
        ep = tier.read_episode(rec["id"])
        frames = ep.frames[next(iter(ep.frames))]
        images, _meta = episode_flow_images(frames, model, size, fs.max_magnitude, fs.stride)
        writer.add(rec["id"], {FLOW: images})
        if progress:
            progress()
    return writer.close()


# ---------------------------------------------------------------------------------------------- export

@torch.no_grad()
def export_latent_actions(params: Any, lam_export: Path, tier_name: str, batch: int = 256) -> dict[str, Any]:
    """`latent_actions` [T-1, 14] for every episode of a tier: the VAE's mean latent of each flow image."""
    vae = LatentActionVAE.from_pretrained(lam_export).eval()
    flows = Feature(feature_dir(features_root(params), FLOW, tier_name))
    tier = Tier(Path(params.data.root) / tier_name)
    if flows.tier_hash != tier.content_hash:
        raise ValueError(f"flow feature of '{tier_name}' was computed from another version of the tier "
                         f"({flows.tier_hash[:12]} != {tier.content_hash[:12]}): rebuild it (motus latent-action flow)")
    lam_hash = folder_hash(lam_export)
    writer = FeatureWriter(feature_dir(features_root(params), LATENT, tier_name), LATENT, tier_name, tier.content_hash,
                           meta={"latent_action_model": str(lam_export), "latent_action_model_hash": lam_hash,
                                 "flow_feature_hash": flows.content_hash})
    for rec in tier.index:
        imgs = flows.get(rec["id"], FLOW)
        parts = []
        for i in range(0, len(imgs), batch):
            x = torch.from_numpy(imgs[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            parts.append(vae.latent(x).float().numpy())
        z = np.concatenate(parts).astype(np.float32)
        assert z.shape == (rec["frames"] - 1, vae.config.latent_dim), (rec["id"], z.shape)
        writer.add(rec["id"], {LATENT: z})
    return writer.close()


class LatentActionSource:
    """What Stage 2's loader reads: `dim` and `get(episode_id)` -> [T-1, d] from the exported feature."""

    def __init__(self, params: Any, tier_name: str):
        self.feature = Feature(feature_dir(features_root(params), LATENT, tier_name))
        arrays = self.feature.manifest.arrays
        shape = arrays.get(LATENT, {}).get("shape") or arrays.get(LATENT, {}).get("trailing_shape")
        self.dim = int(shape[-1]) if shape else int(self.feature.get(self.feature.episode_ids[0], LATENT).shape[1])

    def get(self, episode_id: str) -> np.ndarray:
        return self.feature.get(episode_id, LATENT)
