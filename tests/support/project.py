"""A small pipeline project for the tests: the shipped params.yaml with short stages and small simulator tiers,
the shipped dvc.yaml, and its own copy of the package (as in a checkout; the DVC stages depend on motus/data)."""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
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
    # a few steps do not bring the losses under the shipped thresholds: the gates here catch only divergence
    for gate in raw["gates"].values():
        for rule in gate["rules"]:
            if rule.get("threshold") is not None and rule["metric"].endswith("_loss"):
                rule["threshold"] = 50.0
    raw["evaluation"] = {"seeds": 1, "tasks": ["transfer_cube"], "max_steps": 400, "video_episodes": 1,
                         "workers": 1}
    return raw


def make_project(root: Path, steps: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(small_params(steps), sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    # a project is a checkout of this repository: the DVC stages depend on its motus/data, and a process that
    # starts in the project folder (a Prefect worker's flow run puts it on sys.path) imports this copy
    shutil.copytree(REPO / "motus", root / "motus", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def project_env(root: Path, **extra: str) -> dict:
    env = dict(os.environ, MOTUS_TRACKING_URI=f"sqlite:///{root}/mlflow.db", MOTUS_DATA_REMOTE=str(root / "remote"),
               MLFLOW_DISABLE_TELEMETRY="true", PREFECT_HOME=str(root / ".prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
               PYTHONSAFEPATH="1")  # the project's motus/data copy (a DVC dependency) must not shadow the package
    for k in ("MOTUS_PARAMS", "MOTUS_PARAMS_FILE", "PREFECT_API_URL"):
        env.pop(k, None)
    env.update(extra)
    return env


def add_flows(root: Path) -> None:
    """A deployment loads flows/pipeline.py from the project folder, as it would from a checkout of this repo."""
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
