"""What a run cost and which code it ran: device hours, money, and the git state of the checkout."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import TypedDict

from ..contracts import device_hours

__all__ = ["GitState", "cost", "device_hours", "git_state", "goodput", "run_goodput"]

UNKNOWN_COMMIT = "unknown"


class GitState(TypedDict):
    commit: str  # full sha, or "unknown" (not a repo, no commit yet, or no git executable)
    dirty: bool  # uncommitted changes to tracked files, or untracked (not ignored) files
    branch: str | None  # None when not a repo or HEAD is detached




def goodput(metrics: list[dict], total_device_hours: float, devices: int) -> dict[str, float]:
    """How much of a job's device time trained the model. `metrics`: the job's logged steps in order (its
    metrics.jsonl, which a resumed job appends to); `total_device_hours`: what the job held, from its own start
    to completion; `devices`: processes of the job.

    Productive = each step's time counted once (the last time it ran) x devices. Everything else is lost:
    steps run again after a restart (work since the last checkpoint), restarts, start-up, checkpoint writes and
    validation. `redone` is the part of the loss that is repeated steps."""
    last: dict[int, float] = {}
    redone_s = 0.0
    redone_steps = 0
    for rec in metrics:
        t = rec.get("perf/step_time_s")
        if t is None or "step" not in rec:
            continue
        if rec["step"] in last:
            redone_s += last[rec["step"]]
            redone_steps += 1
        last[rec["step"]] = float(t)
    productive = device_hours(1, devices, sum(last.values()))
    total = max(total_device_hours, productive)
    return {"productive_device_hours": productive, "lost_device_hours": total - productive,
            "redone_device_hours": device_hours(1, devices, redone_s), "redone_steps": float(redone_steps),
            "goodput": productive / total if total > 0 else 1.0}


def run_goodput(run_dir: Path, total_device_hours: float, devices: int) -> dict[str, float] | None:
    """`goodput` of the job whose run folder is `run_dir`, from its `metrics.jsonl`; None when it has none."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return goodput(metrics, total_device_hours, devices)


def cost(device_hours: float, device: str, prices: dict[str, float]) -> float | None:
    """`device_hours` x the hourly price of `device`; None (and a warning) when `device` has no price.

    A missing price is never a silent 0: a run without a known cost must read as unknown, not as free.
    The lookup is exact first, then case-insensitive (`H100` finds `h100`).
    """
    price = prices.get(device)
    if price is None:
        folded = {k.casefold(): v for k, v in prices.items()}
        price = folded.get(device.casefold())
    if price is None:
        warnings.warn(
            f"no price for device {device!r} (priced: {sorted(prices) or 'none'}); cost is unknown",
            UserWarning, stacklevel=2)
        return None
    return float(device_hours) * float(price)


def _git(repo: Path, *args: str) -> str | None:
    """stdout of `git -C repo args...`, stripped; None when git fails or is missing."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # never take the index lock
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                             timeout=30, env=env, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip()


# What a pipeline run itself writes into a checkout is data, not code: DVC's lock and pointer files, the tiers,
# features and outputs. A change there must not mark the code dirty, or every version trained from a fresh
# clone would claim `code (dirty)`.
NOT_CODE = ("dvc.lock", "*.dvc", ".dvc", ".dvcignore", "data", "models", "outputs", "mlruns", "mlartifacts", "*.db")


def git_state(repo: Path) -> GitState:
    """Commit, dirty flag and branch of the checkout at `repo` (via the `git` executable).

    Dirty means the code differs from the commit: changes to the paths in `NOT_CODE` do not count.

    Never raises: outside a repository (or without git) it is `{"commit": "unknown", "dirty": False,
    "branch": None}`. A repository without commits has commit "unknown" but a real branch and dirty flag.
    """
    repo = Path(repo)
    if _git(repo, "rev-parse", "--is-inside-work-tree") != "true":
        return {"commit": UNKNOWN_COMMIT, "dirty": False, "branch": None}
    commit = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}") or UNKNOWN_COMMIT
    status = _git(repo, "status", "--porcelain", "--untracked-files=normal", "--", ".",
                  *(f":(top,exclude,glob)**/{p}" if p.startswith("*") else f":(top,exclude){p}" for p in NOT_CODE))
    branch = _git(repo, "symbolic-ref", "--short", "-q", "HEAD") or None
    # A status that cannot be read is reported dirty: lineage must not claim a clean tree it did not see.
    return {"commit": commit, "dirty": status is None or bool(status), "branch": branch}
