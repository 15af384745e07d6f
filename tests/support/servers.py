"""Real services for tests, each a context manager that starts it on 127.0.0.1 and stops what it started.

- `fresh_postgres_database(prefix)`: a uniquely named database on the local PostgreSQL (127.0.0.1:5432, user
  postgres, trust auth), yielded as a SQLAlchemy URI and dropped afterwards.
- `mlflow_server(backend_uri, artifacts_dir)`: `mlflow server` on a free port, artifacts proxied into a folder.
- `s3_server()`: moto's S3-compatible server on a free port.
- `prefect_server(database_uri, home)`: `prefect server start` with its database on PostgreSQL.

A server runs in its own session (process group) so stopping it reaches its workers too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from motus.launch.local import free_port

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
BIN = Path(sys.executable).parent


def _admin_connection():
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    return conn


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "motus_test") -> Iterator[str]:
    """Create `<prefix>_<random>` on the local PostgreSQL; yield its `postgresql+psycopg2://` URI; drop it."""
    name = f"{prefix}_{secrets.token_hex(4)}".lower()
    if not name.replace("_", "").isalnum():
        raise ValueError(f"database prefix {prefix!r} must be letters, digits and underscores")
    conn = _admin_connection()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def serve(command: Callable[[int], list[str]], health: str, log: Path, env: dict[str, str] | None = None,
          timeout: float = 180.0) -> Iterator[str]:
    """Start `command(port)` on a free 127.0.0.1 port in its own session, wait until `health` (a path) answers
    200, yield `http://127.0.0.1:<port>`; stop the whole process group after."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", **(env or {})))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + health, proc, log, timeout)
        yield url
    finally:
        _stop(proc)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts_dir: Path, timeout: float = 180.0, *,
                  artifacts_destination: str | None = None, env: dict[str, str] | None = None,
                  app_name: str | None = None) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1:<free port> with `backend_uri`; artifacts proxied into `artifacts_dir` (or
    `artifacts_destination`, e.g. s3://bucket/prefix, with the S3 settings in `env`); its log beside them.
    `app_name`: one of MLflow's server apps (`basic-auth`: users and permissions, configured through `env`).

    Yields `http://127.0.0.1:<port>` once `/health` answers; terminates the server and its workers after.
    """
    artifacts_dir = Path(artifacts_dir).resolve()
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    destination = artifacts_destination or artifacts_dir.as_uri()
    with serve(lambda port: [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
                             "--artifacts-destination", destination, "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             *(["--app-name", app_name] if app_name else [])],
               "/health", artifacts_dir.parent / f"mlflow-server-{artifacts_dir.name}.log",
               # the server's job runner (huey consumers, ~10 processes) serves MLflow's GenAI jobs, which the
               # platform does not use: off, so a test server starts in seconds and idles quietly
               {"DO_NOT_TRACK": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}, timeout) as url:
        yield url


@contextlib.contextmanager
def s3_server(timeout: float = 60.0) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1:<free port>; yields its endpoint URL (any access key works)."""
    log = Path(tempfile.mkdtemp(prefix="moto-")) / "moto.log"
    try:
        with serve(lambda port: [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], "/moto-api/", log,
                   timeout=timeout) as url:
            yield url
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)


@contextlib.contextmanager
def prefect_server(database_uri: str, home: Path, timeout: float = 180.0) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1:<free port> with its database on PostgreSQL; yields the API URL."""
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": database_uri.replace("postgresql+psycopg2://",
                                                                       "postgresql+asyncpg://")}
    saved = os.environ.pop("PREFECT_API_URL", None)  # the server must not think it is a client of another one
    try:
        with serve(lambda port: [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   "/api/health", Path(home) / "prefect-server.log", env, timeout) as url:
            yield url + "/api"
    finally:
        if saved is not None:
            os.environ["PREFECT_API_URL"] = saved
