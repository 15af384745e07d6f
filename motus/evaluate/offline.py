"""Offline metrics on held-out windows: world-model video quality, IDM / VLA / joint action error.

The windows come from the episodes the training job held out (`TierWindows(split="heldout")`: the split is a
hash of tier and episode id, so these episodes never reached an optimizer step), evenly spaced through each
tier's held-out windows. Inputs are built by `ExportedModel.inputs`, the training job's own path.

- world model (`wm`): the real first frame + the real actions -> predicted future frames, decoded and compared
  with the real future frames (PSNR, SSIM per frame; LPIPS / FVD only with local feature-network weights).
  Beside it: the floor of copying the conditioning frame forward, and the ceiling of the VAE's own
  reconstruction of the real frames (no prediction can beat its decoder).
- `idm`: the real first and future frames -> actions; `vla`: first frame + language -> actions; `joint`:
  actions and video together. Action MSE is in the model's normalised units over the tier's real action
  dimensions; the floor is predicting zeros (the tier's mean action) on the same windows, and the untrained level
  is 1 + floor (a sampler that returns its N(0, 1) noise). `vla`/`idm` also get a deterministic x0 estimate (one
  step from the noise's mean: the conditional mean a trained model predicts).

Every sampled number is averaged over `draws` seeded noise draws (the same draws on every run: the same
evaluation twice gives the same numbers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contracts import check_normalization
from ..data.loader import TierWindows, collate_windows
from ..data.tier import Tier
from ..model.rectified_flow import window_action_mse
from .metrics import FeatureNet, feature_statistics, frechet_distance, psnr, ssim

# identical frames have infinite PSNR (the copy-forward floor on a still scene): averaged per frame, one such
# frame would make the mean infinite, so a frame counts at most this much (MSE 1e-10, as training validation)
PSNR_CAP_DB = 100.0
MODES_AND_FLOOR = ("vla", "idm", "joint", "floor_zero")  # what each per-window record lists


@dataclass
class OfflineResult:
    metrics: dict[str, float]
    windows: dict[str, int]  # tier -> windows evaluated
    episodes: dict[str, list[str]]  # tier -> held-out episode ids
    per_window: list[dict[str, Any]] = field(default_factory=list)
    sample_frames: np.ndarray | None = None  # [2, F-1, H, W, 3] uint8: real / predicted of the first window


def heldout_windows(exported: Any, params: Any, tiers: Sequence[str],
                    per_tier: int) -> dict[str, tuple[list[dict], list[str]]]:
    """tier -> (`per_tier` evenly spaced held-out windows, fewer when it has fewer; its held-out episode ids)."""
    root = Path(params.data.root)
    out = {}
    for name in tiers:
        if not (root / name / "manifest.json").exists():
            raise FileNotFoundError(f"tier '{name}' (from the model's lineage) is not built under {root}; "
                                    f"run `motus data ingest {name}` to evaluate on its held-out episodes")
        ds = TierWindows(Tier(root / name), exported.spec, split="heldout",
                         heldout_fraction=params.data.heldout_fraction)
        check_normalization(exported.normalization(name), ds.normalization,
                            where=f"{exported.path}: held-out windows of tier '{name}'")
        if len(ds) == 0:
            raise ValueError(f"tier '{name}' has no held-out window (held-out episodes {ds.episode_ids}, "
                             f"too short: {ds.skipped_short_ids})")
        idx = np.unique(np.linspace(0, len(ds) - 1, min(per_tier, len(ds))).round().astype(int))
        out[name] = ([ds[int(i)] for i in idx], list(ds.episode_ids))
    return out


@torch.no_grad()
def offline_metrics(exported: Any, params: Any, tiers: Sequence[str], *, per_tier: int = 8, batch_size: int = 4,
                    seed: int = 0, draws: int = 3, sample_steps: int | None = None, lpips: FeatureNet | None = None,
                    fvd: FeatureNet | None = None, progress: bool = True) -> OfflineResult:
    from tqdm.auto import tqdm

    windows = heldout_windows(exported, params, tiers, per_tier)
    items = [(t, w) for t in tiers for w in windows[t][0]]
    model, vae = exported.model, exported.model.vae
    acc: dict[str, list[float]] = {}
    per_window: list[dict[str, Any]] = []
    real_clips, pred_clips = [], []
    sample_frames = None

    def add(key: str, values) -> None:
        acc.setdefault(key, []).extend(float(v) for v in np.asarray(values).reshape(-1))

    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for b, chunk in enumerate(tqdm(batches, desc="held-out windows", unit="batch", disable=not progress,
                                   leave=False)):
        batch = collate_windows([w for _, w in chunk])
        inputs = exported.inputs(batch)
        dims = [exported.normalization(t)["action_dim"] or inputs["actions"].shape[-1] for t, _ in chunk]
        common = dict(video_latents=inputs["video_latents"], text_embeds=inputs["text_embeds"],
                      state=inputs.get("state"), understanding=inputs.get("understanding"), steps=sample_steps)
        actions = inputs["actions"]
        real = ((batch["video"].float() + 1) / 2).clamp(0, 1)  # [B, 3, F, H, W]
        fut = lambda x: x[:, :, 1:].transpose(1, 2)  # noqa: E731 - [B, F-1, 3, H, W], the predicted frames
        mse: dict[str, torch.Tensor] = {}
        frame_scores: dict[str, list[torch.Tensor]] = {}
        for d in range(draws):  # every sampled number is a mean over `draws` seeded noise draws
            gen = lambda salt, b=b, d=d: torch.Generator(device=exported.device).manual_seed(  # noqa: E731
                seed * 7919 + b * 131 + d * 1_000_003 + salt)
            for salt, mode in enumerate(("vla", "idm", "joint")):
                out = model.sample(mode, **common, generator=gen(salt))
                mse[mode] = mse.get(mode, 0) + window_action_mse(out.actions, actions, dims) / draws
                if mode == "joint":
                    joint_video = out.video_latents
            wm = model.sample("wm", **common, actions=actions, generator=gen(9))
            pred = (vae.decode(wm.video_latents) + 1) / 2
            joint = (vae.decode(joint_video) + 1) / 2
            for key, x in (("wm", pred), ("joint", joint)):
                frame_scores.setdefault(f"{key}_psnr", []).append(psnr(fut(x), fut(real)).clamp(max=PSNR_CAP_DB))
                frame_scores.setdefault(f"{key}_ssim", []).append(ssim(fut(x), fut(real)))
            if d == 0:
                pred0 = pred  # the first draw's frames: LPIPS / FVD, the per-window record, the frame strip
        conditions = {k: v for k, v in common.items() if k != "steps"}
        for mode in ("vla", "idm"):  # deterministic: one step from the noise's mean (MotusModel.estimate_x0)
            mse[f"{mode}_x0"] = window_action_mse(model.estimate_x0(mode, **conditions).actions, actions, dims)
        mse["floor_zero"] = window_action_mse(torch.zeros_like(actions), actions, dims)
        mse["untrained"] = 1.0 + mse["floor_zero"]  # an untrained sampler returns its N(0, 1) noise

        recon = (vae.decode(inputs["video_latents"]) + 1) / 2
        copy = real[:, :, :1].expand_as(real)
        for key, values in frame_scores.items():
            add(key, torch.stack(values).mean(0))
        for key, x in (("wm_floor_copy", copy), ("wm_ceiling_vae", recon)):
            add(f"{key}_psnr", psnr(fut(x), fut(real)).clamp(max=PSNR_CAP_DB))
            add(f"{key}_ssim", ssim(fut(x), fut(real)))
        if lpips is not None:
            add("wm_lpips", lpips.distance(fut(pred0).flatten(0, 1), fut(real).flatten(0, 1)))
        if fvd is not None:
            real_clips.append(fvd.features(real))
            pred_clips.append(fvd.features(pred0))
        for key, v in mse.items():
            add(f"{key.replace('_x0', '')}_action_mse{'_x0' if key.endswith('_x0') else ''}", v)
        for i, (tier, w) in enumerate(chunk):
            per_window.append({"tier": tier, "episode_id": w["episode_id"], "start": int(w["start"]),
                               **{f"{k}_action_mse": float(v[i]) for k, v in mse.items() if k in MODES_AND_FLOOR},
                               "wm_psnr": float(psnr(fut(pred0)[i], fut(real)[i]).clamp(max=PSNR_CAP_DB).mean())})
        if sample_frames is None:
            to_u8 = lambda x: (x[0, :, 1:].clamp(0, 1) * 255).round().byte().permute(1, 2, 3, 0).numpy()  # noqa: E731
            sample_frames = np.stack([to_u8(real), to_u8(pred0)])

    metrics = {f"eval/{k}": _mean(v) for k, v in acc.items()}
    for key in ("eval/floor_zero_action_mse", "eval/untrained_action_mse"):  # the reference levels last
        metrics[key] = metrics.pop(key)
    if fvd is not None:
        r, p = np.concatenate(real_clips), np.concatenate(pred_clips)
        if len(r) >= 2:
            metrics["eval/wm_fvd"] = frechet_distance(*feature_statistics(r), *feature_statistics(p))
    return OfflineResult(metrics, {t: len(windows[t][0]) for t in tiers}, {t: windows[t][1] for t in tiers},
                         per_window, sample_frames)




def _mean(values: list[float]) -> float:
    """Mean over windows/frames; +inf stays +inf (a perfect frame), NaN when there is nothing."""
    return float(np.mean(values)) if values else math.nan
