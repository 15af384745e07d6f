"""The episode schema every source produces and every tier stores.

An episode is one demonstration or clip: camera frames from one or more views (uint8 [T, H, W, 3]),
per-frame actions [T, D] (or None for unlabelled video), optional per-frame state [T, S], language
instruction(s), fps, embodiment, source and a tier-unique id. `problems()` lists everything wrong with it
so ingest can quarantine it with a reason instead of crashing or silently dropping it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .reasons import coded

SCHEMA_VERSION = 1
# WebDataset keys end at the first dot, so ids are restricted to a dot-free, path-safe alphabet.
EPISODE_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


@dataclass
class Episode:
    episode_id: str
    frames: dict[str, np.ndarray]  # view name -> [T, H, W, 3] uint8
    actions: np.ndarray | None = None  # [T, D] float32, aligned with frames; None = unlabelled
    state: np.ndarray | None = None  # [T, S] float32
    instructions: list[str] = field(default_factory=list)
    fps: float = 30.0
    embodiment: str = "unknown"
    source: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-safe provenance (task, seed, success, ...)
    # widths the source's own metadata declares ({"actions": 14, "state": 14}); not stored. Ingest pads an
    # episode into a wider tier only when its declared width says the data really is narrower.
    declared: dict[str, int] = field(default_factory=dict)

    @property
    def views(self) -> list[str]:
        return list(self.frames)

    @property
    def num_frames(self) -> int:
        return min((len(v) for v in self.frames.values()), default=0)

    @property
    def action_dim(self) -> int | None:
        return None if self.actions is None else int(self.actions.shape[-1])

    def problems(self, *, action_dim: int | None = None, require_actions: bool = False,
                 require_instruction: bool = False, action_bounds: tuple[float, float] | None = None,
                 min_frames: int = 2) -> list[str]:
        """Everything that makes this episode unusable, as coded one-line reasons (empty = valid)."""
        out: list[str] = []
        if not isinstance(self.episode_id, str) or not EPISODE_ID.match(self.episode_id):
            out.append(coded("episode.bad_id", f"episode_id {self.episode_id!r} must match {EPISODE_ID.pattern}"))
        if not self.frames:
            out.append(coded("frames.missing", "no camera frames"))
        lengths = set()
        for view, arr in self.frames.items():
            if not isinstance(arr, np.ndarray):
                out.append(coded("frames.type", f"view '{view}': frames are {type(arr).__name__}, not a numpy array"))
                continue
            if arr.dtype != np.uint8:
                out.append(coded("frames.dtype", f"view '{view}': frames dtype {arr.dtype}, expected uint8"))
            if arr.ndim != 4 or arr.shape[-1] != 3:
                out.append(coded("frames.shape", f"view '{view}': frames shape {arr.shape}, expected [T, H, W, 3]"))
                continue
            if arr.shape[1] == 0 or arr.shape[2] == 0:
                out.append(coded("frames.empty", f"view '{view}': empty image {arr.shape[1]}x{arr.shape[2]}"))
            lengths.add(arr.shape[0])
        if len(lengths) > 1:
            out.append(coded("frames.length_mismatch", f"views disagree on length: {sorted(lengths)} frames"))
        t = min(lengths) if lengths else 0
        if lengths and t < min_frames:
            out.append(coded("frames.too_short", f"{t} frames, need at least {min_frames}"))

        if self.actions is None:
            if require_actions or action_dim is not None:
                out.append(coded("actions.missing", "no actions, but this tier is labelled"
                                 + (f" ({action_dim}-d)" if action_dim else "")))
        else:
            out += _array_problems("actions", self.actions, t)
            if action_dim is not None and self.actions.ndim == 2 and self.actions.shape[1] != action_dim:
                out.append(coded("actions.width", f"actions are {self.actions.shape[1]}-d, tier expects {action_dim}-d"))
            if action_bounds is not None and self.actions.ndim == 2 and np.isfinite(self.actions).all():
                lo, hi = action_bounds
                if self.actions.size and (self.actions.min() < lo or self.actions.max() > hi):
                    out.append(coded("actions.out_of_bounds", f"actions outside bounds [{lo}, {hi}]: "
                                     f"min {self.actions.min():.3g}, max {self.actions.max():.3g}"))
        if self.state is not None:
            out += _array_problems("state", self.state, t)

        if not isinstance(self.fps, (int, float)) or not math.isfinite(self.fps) or self.fps <= 0:
            out.append(coded("fps.invalid", f"fps {self.fps!r} must be a positive number"))
        if any(not isinstance(s, str) for s in self.instructions):
            out.append(coded("instruction.type", "instructions must be strings"))
        elif require_instruction and not any(s.strip() for s in self.instructions):
            out.append(coded("instruction.missing", "no language instruction, but this tier requires one"))
        for name in ("embodiment", "source"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                out.append(coded(f"episode.{name}", f"{name} must be a non-empty string"))
        return out

    def metadata(self) -> dict[str, Any]:
        """The JSON record stored beside the arrays in a shard."""
        return {
            "schema_version": SCHEMA_VERSION,
            "episode_id": self.episode_id,
            "num_frames": self.num_frames,
            "views": {v: list(a.shape[1:3]) for v, a in self.frames.items()},
            "action_dim": self.action_dim,
            "state_dim": None if self.state is None else int(self.state.shape[-1]),
            "instructions": list(self.instructions),
            "fps": float(self.fps),
            "embodiment": self.embodiment,
            "source": self.source,
            "extra": self.extra,
        }


def _array_problems(name: str, arr: Any, t: int) -> list[str]:
    if not isinstance(arr, np.ndarray):
        return [coded(f"{name}.type", f"{name} are {type(arr).__name__}, not a numpy array")]
    out = []
    if arr.ndim != 2:
        return [coded(f"{name}.shape", f"{name} shape {arr.shape}, expected [T, D]")]
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        out.append(coded(f"{name}.dtype", f"{name} dtype {arr.dtype} is not numeric"))
        return out
    if t and arr.shape[0] != t:
        out.append(coded(f"{name}.length_mismatch", f"{name} have {arr.shape[0]} steps but frames have {t}"))
    if arr.shape[1] == 0:
        out.append(coded(f"{name}.width", f"{name} have zero width"))
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        out.append(coded(f"{name}.non_finite", f"{name} contain NaN/inf in {bad} step(s)"))
    return out


def compose_three_view(head: np.ndarray, left_wrist: np.ndarray, right_wrist: np.ndarray) -> np.ndarray:
    """The official three-view image: head on top, the two wrist views side by side below at half size.

    All inputs [T, H, W, 3] uint8 of the same size -> [T, H + H//2, W, 3] (W must be even).
    """
    if not (head.shape == left_wrist.shape == right_wrist.shape):
        raise ValueError(f"three-view composition needs equal view shapes, got {head.shape}, "
                         f"{left_wrist.shape}, {right_wrist.shape}")
    t, h, w, _ = head.shape
    if w % 2 or h % 2:
        raise ValueError(f"three-view composition needs even H and W, got {h}x{w}")

    def half(x: np.ndarray) -> np.ndarray:  # 2x2 box filter, exact and dependency-free
        x = x.astype(np.uint16)
        return ((x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2] + 2) // 4).astype(np.uint8)

    bottom = np.concatenate([half(left_wrist), half(right_wrist)], axis=2)
    return np.concatenate([head, bottom], axis=1)
