"""Action-dense, video-sparse training windows cut from tiers, and a deterministic weighted mix of tiers.

Window rule (one window = one training sample)
-----------------------------------------------
With ``K = spec.chunk``, ``r = spec.video_action_ratio`` (``K % r == 0``), ``d = spec.downsample`` and an
episode of ``T`` stored frames, the window that starts at stored frame ``s`` holds

* actions at frames ``s + d*i`` for ``i = 0 .. K-1``                -> ``[K, D]``
* video at frames   ``s + d*r*j`` for ``j = 0 .. K/r`` (inclusive)  -> ``[1 + K/r]`` frames: frame ``s`` is the
  conditioning frame, the other ``K/r`` are the future frames to predict (the last one is ``s + d*K``)
* state at frame    ``s``                                           -> ``[S]``

The largest index a window touches is the last video frame ``s + d*K``, so a start is valid iff
``s + d*K <= T - 1``. Starts are ``s = 0, stride, 2*stride, ...`` up to ``T - 1 - d*K``: an episode yields
``(T - 1 - d*K) // stride + 1`` windows when ``T >= d*K + 1`` and none otherwise. Episodes shorter than
``d*K + 1`` frames are skipped, logged and counted (``TierWindows.skipped_short`` / ``skipped_short_ids``).

Split
-----
The train/held-out split is by episode and depends only on (tier name, episode id) and the set of episode
ids: ``u = int(sha256(f"{tier}/{id}")[:16], 16) / 2**64``, held out iff ``u < heldout_fraction``. When
``heldout_fraction > 0`` and the tier has >= 2 episodes but no episode fell below the fraction, the episode
with the smallest ``u`` is held out; symmetrically, when ``heldout_fraction < 1`` and every episode fell
below it, the one with the largest ``u`` goes to train. No seed enters, so rebuilding gives the same split.

Mixing and resuming
-------------------
``MixedWindows`` position ``i`` draws from ``np.random.default_rng([seed, i])``: a tier by weight, then a
window uniformly within it, so the stream is a pure function of (seed, position, weights, tiers).
``position`` = number of samples of the stream already consumed; ``state_dict()``/``load_state_dict()``
resume exactly there. See ``MixedWindows`` for how positions are sharded over DataLoader workers.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .tier import Tier

log = logging.getLogger(__name__)

Normalization = Literal["mean_std", "min_max", "none"]
Split = Literal["train", "heldout", "all"]
_EPS = 1e-6
_STAT_KEYS = {"mean_std": ("mean", "std"), "min_max": ("q01", "q99"), "none": ()}

__all__ = ["WindowSpec", "TierWindows", "MixedWindows", "collate_windows", "split_episodes",
           "heldout_score", "normalize", "denormalize", "denormalize_actions", "frames_to_video"]


# ------------------------------------------------------------------------------------------------ spec


@dataclass(frozen=True)
class WindowSpec:
    chunk: int  # K actions per window
    video_action_ratio: int  # r: one future video frame per r actions (K % r == 0)
    downsample: int  # d: stride in stored frames between consecutive actions
    image_size: tuple[int, int]  # (H, W) of the returned frames
    view: str | None = None  # camera view; None = the first view in the tier manifest
    normalization: Normalization = "mean_std"
    action_dim: int | None = None  # zero-pad actions to this width (error if the tier is wider)
    state_dim: int | None = None  # zero-pad (or, for wider state, refuse) state to this width

    def __post_init__(self) -> None:
        for name in ("chunk", "video_action_ratio", "downsample"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"WindowSpec.{name} must be a positive integer, got {v!r}")
        if self.chunk % self.video_action_ratio:
            raise ValueError(f"WindowSpec.video_action_ratio {self.video_action_ratio} must divide "
                             f"chunk {self.chunk}")
        size = tuple(self.image_size)
        if len(size) != 2 or any(not isinstance(v, (int, np.integer)) or v < 1 for v in size):
            raise ValueError(f"WindowSpec.image_size must be (H, W) positive integers, got {self.image_size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        if self.normalization not in _STAT_KEYS:
            raise ValueError(f"WindowSpec.normalization must be one of {list(_STAT_KEYS)}, "
                             f"got {self.normalization!r}")
        if self.action_dim is not None and (not isinstance(self.action_dim, (int, np.integer))
                                            or self.action_dim < 1):
            raise ValueError(f"WindowSpec.action_dim must be a positive integer or None, got {self.action_dim!r}")

    @property
    def future_frames(self) -> int:
        """Future video frames per window (K / r); the window returns 1 + this many frames."""
        return self.chunk // self.video_action_ratio

    @property
    def span(self) -> int:
        """Stored frames a window covers: indices s .. s + span - 1 (= d*K + 1)."""
        return self.downsample * self.chunk + 1

    def num_starts(self, num_frames: int, stride: int = 1) -> int:
        """Windows an episode of `num_frames` stored frames yields (0 = too short)."""
        last = num_frames - self.span  # largest valid start
        return 0 if last < 0 else last // stride + 1

    def action_indices(self, start: int) -> np.ndarray:
        return start + self.downsample * np.arange(self.chunk)

    def video_indices(self, start: int) -> np.ndarray:
        return start + self.downsample * self.video_action_ratio * np.arange(self.future_frames + 1)


# ----------------------------------------------------------------------------------------------- split


def heldout_score(tier_name: str, episode_id: str) -> float:
    """Stable pseudo-uniform number in [0, 1) for an episode: the first 64 bits of sha256("tier/id")."""
    digest = hashlib.sha256(f"{tier_name}/{episode_id}".encode()).hexdigest()
    return int(digest[:16], 16) / 2.0**64


def split_episodes(tier_name: str, episode_ids: Sequence[str],
                   heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids), each in the given order; see the module docstring for the rule."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    scores = {e: heldout_score(tier_name, e) for e in episode_ids}
    held = {e for e, u in scores.items() if u < heldout_fraction}
    if len(scores) >= 2:
        if heldout_fraction > 0 and not held:
            held.add(min(scores, key=lambda e: (scores[e], e)))
        if heldout_fraction < 1 and len(held) == len(scores):
            held.discard(max(scores, key=lambda e: (scores[e], e)))
    return [e for e in episode_ids if e not in held], [e for e in episode_ids if e in held]


# ------------------------------------------------------------------------------------------ normalisation


def _stats_used(stats: Mapping[str, Any] | None, method: str, what: str, tier: str) -> dict[str, list[float]] | None:
    if method == "none":
        return None
    if stats is None:
        raise ValueError(f"tier '{tier}': normalization '{method}' needs {what}_stats in the manifest, found none")
    missing = [k for k in _STAT_KEYS[method] if k not in stats]
    if missing:
        raise ValueError(f"tier '{tier}': {what}_stats lack {missing} needed for normalization '{method}'")
    return {k: [float(v) for v in stats[k]] for k in _STAT_KEYS[method]}


def _affine(method: str, stats: Mapping[str, Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(center, scale) such that normalized = (x - center) / scale; degenerate dims get scale 1."""
    if method == "mean_std":
        center, scale = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
    elif method == "min_max":
        lo, hi = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
        center, scale = (lo + hi) / 2, (hi - lo) / 2
    else:
        raise ValueError(f"unknown normalization {method!r}")
    return center, np.where(scale < _EPS, 1.0, scale)


def normalize(x: np.ndarray, method: str, stats: Mapping[str, Sequence[float]] | None) -> np.ndarray:
    """Normalise the last axis of `x` (numpy); min_max maps [q01, q99] to [-1, 1] and clips."""
    x = np.asarray(x, dtype=np.float32)
    if method == "none" or stats is None:
        return x
    center, scale = _affine(method, stats)
    y = (x - center) / scale
    if method == "min_max":
        y = np.clip(y, -1.0, 1.0)
    return y.astype(np.float32)


def denormalize(x: Any, method: str, stats: Mapping[str, Sequence[float]] | None) -> Any:
    """Inverse of `normalize` (exact except for values min_max clipped); numpy or torch in, same type out."""
    if method == "none" or stats is None:
        return x
    center, scale = _affine(method, stats)
    if isinstance(x, torch.Tensor):
        c = torch.as_tensor(center, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
        s = torch.as_tensor(scale, dtype=c.dtype, device=x.device)
        return x * s + c
    x = np.asarray(x)
    return (x.astype(np.float64) * scale + center).astype(x.dtype if x.dtype.kind == "f" else np.float32)


def denormalize_actions(x: Any, normalization: Mapping[str, Any]) -> Any:
    """Model-space actions [..., D or padded D] -> the tier's action space [..., D], given a
    `TierWindows.normalization` record (e.g. the one a checkpoint stored). Padding columns are dropped."""
    dim = normalization.get("action_dim")
    if dim is None:
        raise ValueError(f"tier '{normalization.get('tier')}' is unlabelled: it has no actions to denormalize")
    if x.shape[-1] < dim:
        raise ValueError(f"actions have {x.shape[-1]} dims, the tier has {dim}")
    return denormalize(x[..., :dim], normalization["method"], normalization.get("actions"))


def frames_to_video(frames: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
    """uint8 frames [F, h, w, 3] -> float32 [3, F, H, W] in [-1, 1] at `image_size` (bilinear, antialiased):
    what a window's ``video`` holds, and what a closed-loop evaluator feeds the model from a rendered frame."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [F, 3, h, w]
    if tuple(x.shape[-2:]) != tuple(image_size):
        x = F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()  # [3, F, H, W]


# ------------------------------------------------------------------------------------------ one tier


@dataclass
class _Arrays:
    """An episode read without its frames (the encoder cache holds what the windows need of them)."""

    actions: np.ndarray | None
    state: np.ndarray | None
    num_frames: int


@dataclass
class _Decoded:
    frames: np.ndarray | None  # [T, H, W, 3] uint8, one view; None when the encoder cache stands for them
    actions: np.ndarray | None  # [T, D'] normalised (and padded), float32
    state: np.ndarray | None  # [T, S] normalised, float32


class TierWindows(Dataset):
    """Map-style dataset of the windows of one tier (one split of it); see the module docstring.

    Item: ``video`` float32 [3, 1 + K/r, H, W] in [-1, 1]; ``actions`` float32 [K, D] (normalised, zero
    padded to ``spec.action_dim``) or None for unlabelled tiers; ``state`` float32 [S] (normalised) or None;
    ``instruction`` (the episode's first instruction, "" if none); ``tier``; ``episode_id``; ``start``.
    Decoded episodes live in an LRU cache of ``cache_size`` entries (per process / DataLoader worker).
    """

    def __init__(self, tier: Tier, spec: WindowSpec, split: Split = "train", heldout_fraction: float = 0.1,
                 stride: int = 1, cache_size: int = 4, latent_actions: Any = None, encoded: Any = None):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be a non-negative integer, got {cache_size!r}")
        self.tier, self.spec, self.split = tier, spec, split
        # the encoder cache (`motus.data.encoded.EncodedWindows`): windows come as latents, never decoded
        self.encoded = encoded
        self.heldout_fraction, self.stride, self.cache_size = float(heldout_fraction), stride, cache_size
        m = tier.manifest
        views = list(m.views)
        if not views:
            raise ValueError(f"tier '{tier.name}': the manifest lists no camera views")
        self.view = spec.view if spec.view is not None else views[0]
        if self.view not in views:
            raise ValueError(f"tier '{tier.name}' has no view '{self.view}' (has {views})")

        # Stage 2: actions come from the latent-action feature ([T-1, d] per episode, already in normalised
        # units) instead of the tier, so unlabelled video trains the action expert too
        self.latent_actions = latent_actions
        if latent_actions is not None and getattr(latent_actions, "stride", 1) != spec.downsample:
            raise ValueError(f"tier '{tier.name}': latent actions from flow {latent_actions.stride} frames apart, "
                             f"but the window takes an action every {spec.downsample} frames: rebuild the flow "
                             f"feature with latent_action.flow.stride {spec.downsample} (or null) and re-export")
        self.tier_action_dim: int | None = (latent_actions.dim if latent_actions is not None else m.action_dim)
        self.labelled = self.tier_action_dim is not None
        if self.labelled and spec.action_dim is not None and self.tier_action_dim > spec.action_dim:
            raise ValueError(f"tier '{tier.name}' has {self.tier_action_dim}-d actions, wider than "
                             f"WindowSpec.action_dim={spec.action_dim}")
        method = spec.normalization
        self._action_stats = (_stats_used(m.action_stats, method, "action", tier.name)
                              if self.labelled and latent_actions is None else None)
        self._state_stats = (_stats_used(m.state_stats, method, "state", tier.name)
                             if m.state_stats is not None else None)

        # the index as columns: a tier of a million episodes opens in seconds, in a few hundred MB
        ids = tier.ids()
        self.train_ids, self.heldout_ids = split_episodes(tier.name, ids, self.heldout_fraction)
        chosen = set(ids if split == "all" else self.train_ids if split == "train" else self.heldout_ids)
        last = tier.frame_counts().astype(np.int64) - spec.span  # largest valid start, as num_starts computes it
        starts = np.where(last < 0, 0, last // stride + 1)
        in_split = np.fromiter((e in chosen for e in ids), dtype=bool, count=len(ids))
        self.episode_ids: list[str] = [ids[i] for i in np.flatnonzero(in_split & (starts > 0))]  # >= 1 window
        self.skipped_short_ids: list[str] = [ids[i] for i in np.flatnonzero(in_split & (starts == 0))]
        counts = starts[in_split & (starts > 0)]
        self._cum = np.concatenate([[0], np.cumsum(counts)]).tolist()  # window w: episode bisect_right(cum, w) - 1
        if self.skipped_short_ids:
            log.warning("tier '%s' (%s split): skipped %d episode(s) shorter than %d frames (one window of "
                        "chunk=%d, downsample=%d): %s", tier.name, split, len(self.skipped_short_ids),
                        spec.span, spec.chunk, spec.downsample, self.skipped_short_ids[:5])
        self._frames = ({ids[i]: int(n) for i, n in enumerate(tier.frame_counts()) if in_split[i]}
                        if encoded is not None else {})
        self._cache: OrderedDict[str, _Decoded] = OrderedDict()
        self.decodes = 0  # episodes decoded so far (cache misses), for diagnostics

    # -- bookkeeping ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.tier.name

    @property
    def content_hash(self) -> str:
        return self.tier.content_hash

    @property
    def skipped_short(self) -> int:
        """How many episodes of this split were skipped as too short for one window."""
        return len(self.skipped_short_ids)

    @property
    def action_dim(self) -> int | None:
        """Width of the returned actions (tier width, or spec.action_dim when padding); None if unlabelled."""
        if not self.labelled:
            return None
        return self.spec.action_dim or self.tier_action_dim

    @property
    def normalization(self) -> dict[str, Any]:
        """JSON-safe record of how actions/state were normalised (store it in a checkpoint)."""
        return {
            "method": self.spec.normalization,
            "tier": self.tier.name,
            "embodiment": self.tier.manifest.embodiment,
            "content_hash": self.tier.content_hash,
            "action_dim": self.tier_action_dim,
            "action_names": (list(self.tier.manifest.action_names)
                             if self.tier.manifest.action_names and self.latent_actions is None else None),
            "padded_action_dim": self.action_dim,
            "actions": self._action_stats,
            "state": self._state_stats,
        }

    def denormalize_actions(self, x: Any) -> Any:
        """Normalised (possibly padded) actions [..., D'] -> raw tier actions [..., D]; numpy or torch."""
        return denormalize_actions(x, self.normalization)

    def __len__(self) -> int:
        return self._cum[-1]

    def locate(self, index: int) -> tuple[str, int]:
        """Window index -> (episode id, start frame)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"window {index} out of range for tier '{self.name}' ({n} windows)")
        index %= n
        e = bisect.bisect_right(self._cum, index) - 1
        return self.episode_ids[e], (index - self._cum[e]) * self.stride

    # -- reading --------------------------------------------------------------------------------------
    def _decoded(self, episode_id: str) -> _Decoded:
        hit = self._cache.get(episode_id)
        if hit is not None:
            self._cache.move_to_end(episode_id)
            return hit
        # mixed-embodiment tiers name their cameras differently: without an explicit view, each episode
        # contributes its own first camera
        if self.encoded is not None:  # actions and state only: the frames' encodings are in the cache
            raw_actions, raw_state = self.tier.read_arrays(episode_id)
            ep = _Arrays(raw_actions, raw_state, int(self._frames[episode_id]))
            view = None
        else:
            ep = self.tier.read_episode(episode_id, views=[self.view] if self.spec.view is not None else None,
                                        prefer=self.view)
            view = self.view if self.view in ep.frames else next(iter(ep.frames))
        self.decodes += 1
        actions = None
        if self.latent_actions is not None:
            actions = np.asarray(self.latent_actions.get(episode_id), dtype=np.float32)
            stride = self.latent_actions.stride
            if len(actions) != ep.num_frames - stride:
                raise ValueError(f"latent actions of '{self.name}/{episode_id}' have {len(actions)} steps, the episode "
                                 f"{ep.num_frames} frames (expected {ep.num_frames - stride} at flow stride {stride}): "
                                 f"re-export the feature")
            # latent t covers frames t .. t+stride; a window's last action index is <= T-1-stride, so the rows
            # past the last latent are never read as an action: NaN makes any reader that did loud
            actions = np.concatenate([actions, np.full((stride - 1, actions.shape[1]), np.nan, np.float32)])
            if self.action_dim > actions.shape[1]:
                actions = np.pad(actions, ((0, 0), (0, self.action_dim - actions.shape[1])))
        elif self.labelled:
            if ep.actions is None:
                raise ValueError(f"tier '{self.name}' is labelled but episode '{episode_id}' has no actions")
            actions = normalize(ep.actions, self.spec.normalization, self._action_stats)
            if self.action_dim > actions.shape[1]:
                actions = np.pad(actions, ((0, 0), (0, self.action_dim - actions.shape[1])))
        state = None
        if ep.state is not None:
            state = normalize(ep.state, self.spec.normalization, self._state_stats)
            want = self.spec.state_dim
            if want is not None and state.shape[1] != want:
                if state.shape[1] > want:
                    raise ValueError(f"tier '{self.name}' episode '{episode_id}': state is {state.shape[1]}-d, "
                                     f"wider than WindowSpec.state_dim={want}")
                state = np.pad(state, ((0, 0), (0, want - state.shape[1])))
        out = _Decoded(frames=ep.frames[view] if view is not None else None, actions=actions, state=state)
        if self.cache_size:
            self._cache[episode_id] = out
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def _video(self, frames: np.ndarray) -> torch.Tensor:
        return frames_to_video(frames, self.spec.image_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        episode_id, start = self.locate(int(index))
        d = self._decoded(episode_id)
        actions = None
        if d.actions is not None:
            actions = torch.from_numpy(d.actions[self.spec.action_indices(start)].copy())
        state = None if d.state is None else torch.from_numpy(d.state[start].copy())
        instructions = self.tier.instructions(episode_id)
        if self.encoded is not None:
            seen: dict[str, Any] = self.encoded.window(episode_id, start)
        else:
            seen = {"video": self._video(d.frames[self.spec.video_indices(start)])}
        return {
            **seen,
            "actions": actions,
            "state": state,
            "instruction": instructions[0] if instructions else "",
            "tier": self.name,
            "episode_id": episode_id,
            "start": start,
        }

    def __repr__(self) -> str:
        return (f"TierWindows(tier={self.name!r}, split={self.split!r}, episodes={len(self.episode_ids)}, "
                f"windows={len(self)}, skipped_short={self.skipped_short})")


# ---------------------------------------------------------------------------------------------- mixing


class MixedWindows(IterableDataset):
    """Deterministic weighted stream over several `TierWindows` (keys = tier names used in the state).

    Position ``i`` of the stream draws ``rng = np.random.default_rng([seed, i])``, picks a source with
    probability ``weight / sum(weights)`` (sources in sorted-name order) from ``rng.random()``, then a window
    ``rng.integers(len(source))``: the stream is a pure function of (seed, position). ``mix[i]`` returns
    position ``i`` directly; iterating yields positions ``position, position + 1, ...`` (up to
    ``num_samples`` when set, else forever).

    Positions and DataLoader workers: with ``n`` workers, positions from ``position`` on are cut into blocks
    of ``worker_block`` consecutive positions, and worker ``k`` yields blocks ``k, k + n, k + 2n, ...``
    (with the default ``worker_block=1``: positions ``position + k, position + k + n, ...``). The DataLoader
    takes batches from the workers round-robin, so with ``batch_size == worker_block`` (or ``batch_size=1``
    / ``None`` and the default block) the loader emits exactly the positions ``position, position + 1, ...``
    in order, the same stream as ``num_workers=0``. ``position`` counts samples CONSUMED: without workers the
    iterator advances ``self.position`` as it yields; with workers the copies in the worker processes
    advance and this object's position does not, so checkpoint with ``state_dict(position=start +
    samples_consumed)`` (samples the training loop took out of the DataLoader; prefetched ones don't count).
    """

    def __init__(self, sources: Mapping[str, TierWindows], weights: Mapping[str, float], seed: int,
                 num_samples: int | None = None, worker_block: int = 1):
        if not sources:
            raise ValueError("MixedWindows needs at least one source tier")
        unknown = sorted(set(weights) - set(sources))
        if unknown:
            raise ValueError(f"weight given for unknown tier(s) {unknown}; sources are {sorted(sources)}")
        for name in sorted(sources):
            if name not in weights:
                raise ValueError(f"tier '{name}' has no weight (every source needs an explicit weight > 0)")
            w = weights[name]
            if not isinstance(w, (int, float, np.floating, np.integer)) or not np.isfinite(w) or w <= 0:
                raise ValueError(f"tier '{name}': weight must be a finite number > 0, got {w!r}")
            if len(sources[name]) == 0:
                src = sources[name]
                raise ValueError(f"tier '{name}' has zero windows ({src!r}); drop it from the mix or use "
                                 f"a shorter window")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 0):
            raise ValueError(f"num_samples must be a non-negative integer or None, got {num_samples!r}")
        if not isinstance(worker_block, int) or worker_block < 1:
            raise ValueError(f"worker_block must be a positive integer, got {worker_block!r}")
        self.sources = dict(sources)
        self.weights = {k: float(weights[k]) for k in sorted(sources)}
        self.names = sorted(sources)
        total = sum(self.weights.values())
        self.probabilities = {k: w / total for k, w in self.weights.items()}
        self._cum = np.cumsum([self.probabilities[k] for k in self.names])
        self.seed, self.num_samples, self.worker_block = int(seed), num_samples, worker_block
        self.position = 0

    def sample_index(self, i: int) -> tuple[str, int]:
        """Position i of the stream -> (tier name, window index), without decoding anything."""
        if i < 0:
            raise IndexError(f"stream position must be >= 0, got {i}")
        rng = np.random.default_rng([self.seed, int(i)])
        k = min(int(np.searchsorted(self._cum, rng.random(), side="right")), len(self.names) - 1)
        name = self.names[k]
        return name, int(rng.integers(len(self.sources[name])))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.num_samples is not None and i >= self.num_samples:
            raise IndexError(f"position {i} beyond num_samples={self.num_samples}")
        name, w = self.sample_index(i)
        return self.sources[name][w]

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("MixedWindows without num_samples is an infinite stream and has no length")
        return self.num_samples

    def _positions(self, start: int, worker: int, workers: int) -> Iterator[int]:
        b, block = self.worker_block, worker
        while True:
            for j in range(b):
                p = start + block * b + j
                if self.num_samples is not None and p >= self.num_samples:
                    return
                yield p
            block += workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            for p in self._positions(self.position, 0, 1):
                item = self[p]
                self.position = p + 1
                yield item
        else:
            for p in self._positions(self.position, info.id, info.num_workers):
                yield self[p]

    # -- checkpointing --------------------------------------------------------------------------------
    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Resumable state; pass `position` (samples consumed) when iterating through DataLoader workers."""
        return {
            "seed": self.seed,
            "position": int(self.position if position is None else position),
            "weights": dict(self.weights),
            "tiers": {k: self.sources[k].content_hash for k in self.names},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at `state['position']` with its seed; refuses other tiers (content hashes) or weights."""
        missing = [k for k in ("seed", "position", "weights", "tiers") if k not in state]
        if missing:
            raise ValueError(f"MixedWindows state lacks {missing}")
        mine = {k: self.sources[k].content_hash for k in self.names}
        theirs = dict(state["tiers"])
        if set(mine) != set(theirs):
            raise ValueError(f"cannot resume: the state mixes tiers {sorted(theirs)}, this loader mixes "
                             f"{sorted(mine)}")
        changed = [k for k in self.names if mine[k] != theirs[k]]
        if changed:
            raise ValueError("cannot resume: tier content changed since the state was saved: "
                             + ", ".join(f"'{k}' (saved {theirs[k][:12]}, now {mine[k][:12]})" for k in changed))
        theirs_w = {k: float(v) for k, v in dict(state["weights"]).items()}
        if theirs_w != self.weights:
            raise ValueError(f"cannot resume: the state was saved with weights {theirs_w}, this loader has "
                             f"{self.weights}")
        position = state["position"]
        if not isinstance(position, (int, np.integer)) or position < 0:
            raise ValueError(f"MixedWindows state has an invalid position {position!r}")
        self.seed, self.position = int(state["seed"]), int(position)


# --------------------------------------------------------------------------------------------- collate


def _stack_optional(items: Sequence[Mapping[str, Any]], key: str, allow_missing: bool,
                    flag: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stack items[key]; (tensor or None, mask or None). Mixed present/absent raises unless allowed."""
    present = [it[key] is not None for it in items]
    shapes = {tuple(it[key].shape) for it in items if it[key] is not None}
    if len(shapes) > 1:
        by = sorted({(it["tier"], tuple(it[key].shape)) for it in items if it[key] is not None})
        hint = "; set WindowSpec.action_dim to pad actions to a common width" if key == "actions" else ""
        raise ValueError(f"cannot batch {key} of different shapes {by}{hint}")
    if all(present):
        out = torch.stack([it[key] for it in items])
        return out, (torch.ones(len(items), dtype=torch.bool) if allow_missing else None)
    if not any(present):
        return None, (torch.zeros(len(items), dtype=torch.bool) if allow_missing else None)
    if not allow_missing:
        with_ = sorted({it["tier"] for it in items if it[key] is not None})
        without = sorted({it["tier"] for it in items if it[key] is None})
        raise ValueError(f"batch mixes items with {key} (tiers {with_}) and without (tiers {without}); "
                         f"pass {flag}=True to get zeros plus a {key[:-1] if key.endswith('s') else key}_mask")
    (shape,) = shapes
    ref = next(it[key] for it in items if it[key] is not None)
    out = torch.stack([it[key] if it[key] is not None else torch.zeros(shape, dtype=ref.dtype) for it in items])
    return out, torch.tensor(present, dtype=torch.bool)


def _pad_understanding(rows: Sequence[torch.Tensor | None]) -> Any:
    """Cached VLM states [L_i, H] -> one right-padded `UnderstandingContext`, as the VLM returns a batch."""
    if any(r is None for r in rows):
        return None
    from ..model.vlm import UnderstandingContext

    width = max(r.shape[0] for r in rows)
    features = torch.zeros(len(rows), width, rows[0].shape[1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        features[i, : len(r)], mask[i, : len(r)] = r, True
    return UnderstandingContext(features, mask)


def collate_windows(items: Sequence[Mapping[str, Any]], allow_missing_actions: bool = False) -> dict[str, Any]:
    """Batch window items: ``video`` [B, 3, F, H, W] (or, read from the encoder cache, ``video_latents``,
    ``text_embeds`` and ``understanding``), ``actions`` [B, K, D] or None, ``state`` [B, S] or None,
    ``start`` [B] long, and lists for ``instruction``/``tier``/``episode_id``.

    A batch mixing labelled and unlabelled items raises ValueError unless ``allow_missing_actions=True``; then
    missing actions are zeros and ``action_mask`` [B] bool marks the real ones (likewise ``state_mask``
    for state). With ``allow_missing_actions=True`` the masks are always present.
    Use with a DataLoader as ``collate_fn=collate_windows`` or ``functools.partial(collate_windows,
    allow_missing_actions=True)``.
    """
    if not items:
        raise ValueError("collate_windows: empty batch")
    cached = ["video_latents" in it for it in items]
    if any(cached) and not all(cached):
        raise ValueError("cannot batch windows read from the encoder cache with windows to encode live "
                         f"(tiers {sorted({it['tier'] for it in items})})")
    what = "video_latents" if all(cached) else "video"
    shapes = {tuple(it[what].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch {what} of different shapes {sorted(shapes)}")
    actions, action_mask = _stack_optional(items, "actions", allow_missing_actions, "allow_missing_actions")
    state, state_mask = _stack_optional(items, "state", allow_missing_actions, "allow_missing_actions")
    out: dict[str, Any] = {what: torch.stack([it[what] for it in items])}
    if all(cached):
        out["text_embeds"] = torch.stack([it["text_embeds"] for it in items])
        out["understanding"] = _pad_understanding([it["understanding"] for it in items])
    out.update({
        "actions": actions,
        "state": state,
        "instruction": [it["instruction"] for it in items],
        "tier": [it["tier"] for it in items],
        "episode_id": [it["episode_id"] for it in items],
        "start": torch.tensor([int(it["start"]) for it in items], dtype=torch.long),
    })
    if allow_missing_actions:
        out["action_mask"], out["state_mask"] = action_mask, state_mask
    return out


def window_spec_from_params(window: Any, model: Any, action_dim: int | None = None,
                            state_dim: int | None = None) -> WindowSpec:
    """`params.yaml`'s `data.window` (a `motus.config.WindowConfig`) + the model's MotusConfig -> WindowSpec.

    The model fixes K (action chunk), the pixel frames per sample (1 + K/ratio) and the image size; the ratio
    defaults to K / (num_frames - 1) and must agree with the model when given explicitly.
    """
    k, future = model.action.chunk, model.num_frames - 1
    ratio = window.video_action_ratio
    if ratio is None:
        if k % future:
            raise ValueError(f"model.action_chunk={k} is not a multiple of the model's {future} future frames; "
                             f"set data.window.video_action_ratio")
        ratio = k // future
    elif k % ratio or k // ratio != future:
        raise ValueError(f"data.window.video_action_ratio={ratio}: action_chunk {k} / {ratio} future frames != "
                         f"the model's {future} (num_video_frames - 1)")
    downsample = window.downsample if window.downsample is not None else getattr(model, "downsample", 3)
    return WindowSpec(chunk=k, video_action_ratio=ratio, downsample=downsample,
                      image_size=(model.height, model.width), view=window.view,
                      normalization=window.normalization, action_dim=action_dim, state_dim=state_dim)
