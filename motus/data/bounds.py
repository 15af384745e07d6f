"""Physical bounds per embodiment: joint positions no real arm of that kind can reach are refused at ingest.

Bounds are on by default for the embodiments listed here and apply to actions and state alike, on the
episode's native dimensions (before any zero-padding into a wider tier). A tier turns them off with
``physical_bounds: off`` or gives its own as ``physical_bounds: [[lo, hi], ...]`` (one pair per dimension)
in the source options (a single list bounds the actions, and the state where it is as wide; or
``{actions: [...], state: [...]}``). An embodiment not listed is not checked (say so with your own bounds).

ALOHA (two ViperX 300 6DOF arms, 14-d: per arm waist, shoulder, elbow, forearm roll, wrist angle, wrist
rotate, gripper): joint ranges in radians as the ALOHA MuJoCo model declares them (``vx300s_left.xml`` /
``vx300s_right.xml`` of the ACT and gym-aloha assets, which take them from Trossen Robotics' ViperX 300 6DOF
specification: waist +-180 deg, shoulder -106..72 deg, elbow -101..92 deg, forearm roll +-180 deg, wrist
angle -107..128 deg, wrist rotate +-180 deg). The gripper is the normalised opening ALOHA's recorders write
(0 closed, 1 open). A margin of ``MARGIN`` rad absorbs encoder noise and the controller overshoot real
recordings show at the joint limits. The gripper gets ``GRIPPER_MARGIN``: its finger slides are pressed past
their nominal travel when the fingers squeeze or are pushed open by contact (our own MuJoCo ALOHA records
1.27 open under contact; a margin of 0.25 quarantined one of 64 valid random-reaching episodes). A value beyond
the margins is a unit mix-up (degrees, ticks) or a corrupted row, not a pose.

Meta-World (Sawyer, 4-d: xyz end-effector delta, gripper): the environment's action space is the box
[-1, 1]^4 (``metaworld.envs.mujoco.sawyer_xyz.SawyerXYZEnv.action_space``); its state is not bounded here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["EMBODIMENT_BOUNDS", "GRIPPER_MARGIN", "MARGIN", "declared_width", "resolve_bounds", "bounds_problem"]

MARGIN = 0.05
GRIPPER_MARGIN = 0.5  # of the normalised opening (see above)
_PI = 3.14158  # the model files' value for +-180 deg
_VX300S = [(-_PI, _PI), (-1.85005, 1.25664), (-1.76278, 1.6057), (-_PI, _PI), (-1.8675, 2.23402), (-_PI, _PI)]
_GRIPPER = (0.0, 1.0)


def _with_margin(pairs: list[tuple[float, float]], margin: float) -> list[tuple[float, float]]:
    return [(lo - margin, hi + margin) for lo, hi in pairs]


_ALOHA_ARM = _with_margin(_VX300S, MARGIN) + _with_margin([_GRIPPER], GRIPPER_MARGIN)

# embodiment -> {"actions": [(lo, hi)] per dim, "state": [(lo, hi)] per dim or None}
EMBODIMENT_BOUNDS: dict[str, dict[str, list[tuple[float, float]] | None]] = {
    "aloha": {"actions": _ALOHA_ARM * 2, "state": _ALOHA_ARM * 2},
    "metaworld": {"actions": [(-1.0, 1.0)] * 4, "state": None},
}


def declared_width(embodiment: str) -> int | None:
    """The action width an embodiment listed here has (14 for ALOHA), else None."""
    entry = EMBODIMENT_BOUNDS.get(embodiment)
    return len(entry["actions"]) if entry and entry.get("actions") else None


def resolve_bounds(option: Any, embodiment: str) -> dict[str, list[tuple[float, float]] | None] | None:
    """The bounds to check one episode against: the tier's own (a list of pairs, for actions and state), none
    (``off``/``false``), or the embodiment's defaults (unset or ``default``)."""
    if option in (None, "default", "auto"):
        return EMBODIMENT_BOUNDS.get(embodiment)
    if option in ("off", False, "none"):
        return None
    if isinstance(option, dict):  # {actions: [[lo, hi], ...], state: [[lo, hi], ...]}
        unknown = set(option) - {"actions", "state"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} (expected actions, state)")
        return {k: _pairs(option.get(k)) for k in ("actions", "state")}
    pairs = _pairs(option)  # one list: the actions', and the state's where it is as wide (joint positions)
    return {"actions": pairs, "state": pairs}


def _pairs(option: Any) -> list[tuple[float, float]] | None:
    if option is None:
        return None
    pairs = []
    for i, pair in enumerate(option):
        if isinstance(pair, (str, bytes)) or len(pair) != 2 or isinstance(pair[0], bool) or isinstance(pair[1], bool):
            raise ValueError(f"entry {i} is {pair!r}, not [lo, hi]")
        lo, hi = float(pair[0]), float(pair[1])
        if not lo < hi:
            raise ValueError(f"entry {i}: lo {lo:g} is not below hi {hi:g}")
        pairs.append((lo, hi))
    return pairs


def bounds_problem(name: str, values: np.ndarray | None, pairs: list[tuple[float, float]] | None,
                   labels: list[str] | None = None) -> tuple[str, str] | None:
    """(code, message) for the first dimension of `values` [T, D] outside its pair, or None. A width other
    than the bounds' is left to the width checks (it is a different problem)."""
    if values is None or pairs is None or values.ndim != 2 or values.shape[1] != len(pairs):
        return None
    if not np.isfinite(values).all():
        return None  # NaN/inf is reported by the episode's own checks
    lo = np.array([p[0] for p in pairs], dtype=np.float64)
    hi = np.array([p[1] for p in pairs], dtype=np.float64)
    v = values.astype(np.float64)
    outside = (v < lo) | (v > hi)
    if not outside.any():
        return None
    steps, dims = np.nonzero(outside)
    t, d = int(steps[0]), int(dims[0])
    label = labels[d] if labels and d < len(labels) else f"dim {d}"
    n_dims = len(set(dims.tolist()))
    return (f"{name}.out_of_bounds",
            f"{name} {label} = {v[t, d]:.4g} at step {t}, physical range [{lo[d]:.4g}, {hi[d]:.4g}]"
            f" ({int(outside.any(axis=1).sum())} step(s), {n_dims} dim(s) outside)")
