"""The latent-action VAE's training data: every (tier, episode, t) optical-flow image of its tiers, and for
labelled episodes the action that flow shows, normalised per (tier, embodiment). Batches are a pure function of
(seed, positions), so a resumed job sees exactly the batches an uninterrupted one would have."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features import Feature, feature_dir
from .latent_actions import FLOW, features_root, probe_heldout_fraction
from .loader import split_episodes
from .tier import Tier


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

    A flow image t shows the motion between stored frames t and t + stride (the flow feature's stride, which
    Stage 2 requires to equal the window's downsample: one latent per action the window samples).
    target "delta": what that flow shows. For position targets (ALOHA joints: a[t] ~ state[t+1]) the pose moves
    from a[t-1] to a[t+stride-1] (a[-1] is the first state); for motion commands (Meta-World's xyz delta) it is
    the mean command over the stride. "absolute": the raw action a[t]. Targets are normalised per (tier,
    embodiment) with that group's statistics over the tier."""

    def __init__(self, params: Any, tiers: list[str], split: str, latent_dim: int, target: str = "delta"):
        self.params, self.split, self.target, self.latent_dim = params, split, target, latent_dim
        root = Path(params.data.root)
        self.flows = {t: Feature(feature_dir(features_root(params), FLOW, t)) for t in tiers}
        strides = {t: int(f.meta.get("stride", 1)) for t, f in self.flows.items()}
        if len(set(strides.values())) > 1:
            raise ValueError(f"flow features of different strides {strides}: rebuild them (motus latent-action flow)")
        self.stride = next(iter(strides.values()))
        self.tiers = {t: Tier(root / t) for t in tiers}
        self.items: list[tuple[str, str, int]] = []  # (tier, episode, count)
        self.labelled: list[tuple[str, str, int]] = []
        self.groups: dict[tuple[str, str], dict[str, Any]] = {}  # (tier, embodiment) -> dims, kind, mean, std
        self._group_of: dict[tuple[str, str], tuple[str, str]] = {}
        self.by_embodiment: dict[str, list[tuple[str, str, int]]] = {}
        for t, tier in self.tiers.items():
            train_ids, held = split_episodes(t, [r["id"] for r in tier.index], probe_heldout_fraction(params))
            chosen = set(train_ids if split == "train" else held)
            if tier.manifest.action_dim:
                self._fit_groups(t, tier)
            for rec in tier.index:
                if rec["id"] not in chosen or rec["frames"] <= self.stride:
                    continue
                entry = (t, rec["id"], rec["frames"] - self.stride)
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

    def _raw_target(self, actions: np.ndarray, state: np.ndarray | None, positions: bool) -> np.ndarray:
        """[T-stride, d]: the label of flow t (frames t -> t + stride)."""
        s, n = self.stride, len(actions) - self.stride
        if self.target != "delta":
            return actions[:n]
        if positions:  # pose at frame t ~ a[t-1]; the first frame's pose is the first state (or a[0])
            first = state[:1, :actions.shape[1]] if state is not None else actions[:1]
            pose = np.concatenate([first, actions[:-1]])
            return pose[s:s + n] - pose[:n]
        return np.stack([actions[k:k + n] for k in range(s)]).mean(0)  # mean command over the stride

    def _fit_groups(self, t: str, tier: Tier) -> None:
        """Statistics per (tier, embodiment) over the whole tier (both splits: a unit, not a label)."""
        by: dict[str, list[tuple[str, np.ndarray, np.ndarray | None, int]]] = {}
        for rec in tier.index:
            native = rec.get("native_action_dim") or tier.manifest.action_dim
            if not native or native > self.latent_dim or rec["frames"] <= self.stride:
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
            d = np.concatenate([self._raw_target(a, st, positions) for _, a, st, _ in eps])
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
                raw, state = self.tiers[tier].read_arrays(eid)
                norm = (self._raw_target(raw[:, :n], state, info["positions"]) - info["mean"]) / info["std"]
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
