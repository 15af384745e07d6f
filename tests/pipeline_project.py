"""A small pipeline project for the tests: the shipped params.yaml with short stages and small simulator tiers,
the shipped dvc.yaml, and its own copy of the package (as in a checkout; the DVC stages depend on motus/data)."""

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


def prefect_server(db_uri: str, home: Path, timeout: float = 180.0):
    """`prefect server start` on 127.0.0.1:<free port> with its database on PostgreSQL; yields the API URL."""
    import contextlib
    import subprocess

    from .servers import _stop, _wait_http, free_port

    @contextlib.contextmanager
    def run():
        port = free_port()
        home.mkdir(parents=True, exist_ok=True)
        log = home / f"prefect-server-{port}.log"
        env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_API_DATABASE_CONNECTION_URL=db_uri.replace("postgresql+psycopg2://", "postgresql+asyncpg://"),
                   PREFECT_UI_ENABLED="false")
        env.pop("PREFECT_API_URL", None)
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(MOTUS.parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                     "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        try:
            _wait_http(f"http://127.0.0.1:{port}/api/health", proc, log, timeout)
            yield f"http://127.0.0.1:{port}/api"
        finally:
            _stop(proc)

    return run()


def mlflow_s3_server(backend_uri: str, artifacts: str, s3_endpoint: str, log_dir: Path, timeout: float = 180.0):
    """`mlflow server` on PostgreSQL whose artifacts go to S3 (`artifacts` = s3://bucket/prefix) through the server."""
    import contextlib
    import subprocess

    from .servers import _stop, _wait_http, free_port

    @contextlib.contextmanager
    def run():
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"mlflow-server-{port}.log"
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_S3_ENDPOINT_URL=s3_endpoint, **S3_CREDENTIALS)
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(MOTUS.parent / "mlflow"), "server", "--backend-store-uri", backend_uri,
                                     "--artifacts-destination", artifacts, "--serve-artifacts", "--host", "127.0.0.1",
                                     "--port", str(port), "--workers", "1"], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        try:
            _wait_http(f"http://127.0.0.1:{port}/health", proc, log, timeout)
            yield f"http://127.0.0.1:{port}"
        finally:
            _stop(proc)

    return run()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
