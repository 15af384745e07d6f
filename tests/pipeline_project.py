"""A small pipeline project for the tests: the shipped params.yaml with short stages and small simulator tiers,
the shipped dvc.yaml, and its own copy of the data code (the DVC stages depend on it)."""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MOTUS = Path(sys.executable).parent / "motus"


def shrink(options: dict) -> dict:
    out = copy.deepcopy(options)
    if "n" in out:
        out["n"] = 2
    if "episodes_per_task" in out:
        out["episodes_per_task"] = 1
    if "tasks" in out:
        out["tasks"] = out["tasks"][:2]
    if "parts" in out:
        out["parts"] = [dict(p, options=shrink(p.get("options", {}))) for p in out["parts"]]
    return out


def small_params(steps: int = 6) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for s in raw["stages"].values():
        s.update(steps=steps, batch_size=2, checkpoint_every=2, validate_every=steps, warmup_steps=1)
    for t in raw["tiers"].values():
        t["source"]["options"] = shrink(t["source"]["options"])
    raw["latent_action"].update(steps=10, batch_size=8, checkpoint_every=10, validate_every=10, warmup_steps=2)
    return raw


def make_project(root: Path, steps: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(small_params(steps), sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "motus" / "data", root / "motus" / "data", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def project_env(root: Path, **extra: str) -> dict:
    env = dict(os.environ, MOTUS_TRACKING_URI=f"sqlite:///{root}/mlflow.db", MOTUS_DATA_REMOTE=str(root / "remote"),
               MLFLOW_DISABLE_TELEMETRY="true", PREFECT_HOME=str(root / ".prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    for k in ("MOTUS_PARAMS", "MOTUS_PARAMS_FILE", "PREFECT_API_URL"):
        env.pop(k, None)
    env.update(extra)
    return env
