"""DVC versioning of tiers: `dvc repro` the per-tier stages, push them to the configured remote, read hashes.

The remote comes from the environment (MOTUS_DATA_REMOTE: a local folder by default, `s3://bucket/prefix`
in production, MOTUS_S3_ENDPOINT_URL for S3-compatible stores) and is written to `.dvc/config.local`, so
a machine's remote never leaks into the committed DVC config. The tier hash lineage records is the DVC
hash of the tier folder (the `md5` of its `.dir` entry in dvc.lock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REMOTE_NAME = "motus"


class VersioningError(Exception):
    pass


def _dvc(args: list[str], cwd: Path, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # stage commands call `motus`: make the interpreter's own scripts folder win on PATH
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, text=True,
                          capture_output=capture)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip() if capture else ""
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {cwd} (exit {proc.returncode}): {detail}")
    return proc


def ensure_repo(root: Path) -> None:
    if (root / ".dvc").is_dir():
        return
    args = ["init", "--quiet"] + ([] if (root / ".git").exists() else ["--no-scm"])
    _dvc(args, root)
    _dvc(["config", "core.autostage", "true"], root, check=False)


def configure_remote(root: Path, url: str, endpoint_url: str | None = None) -> str:
    """Point the `motus` remote at `url` (a folder or s3://...); return the resolved URL."""
    if "://" not in url:
        path = Path(url).expanduser()
        url = str(path if path.is_absolute() else (root / path).resolve())
        Path(url).mkdir(parents=True, exist_ok=True)
    _dvc(["remote", "add", "--local", "--force", "--default", REMOTE_NAME, url], root)
    if endpoint_url:
        _dvc(["remote", "modify", "--local", REMOTE_NAME, "endpointurl", endpoint_url], root)
    return url


def stage_name(tier: str) -> str:
    return f"ingest@{tier}"


def reproduce(root: Path, tiers: list[str], force: bool = False) -> None:
    repro_stages(root, [stage_name(t) for t in tiers], force=force)


def push(root: Path, tiers: list[str]) -> None:
    push_stages(root, [stage_name(t) for t in tiers])


def pull(root: Path, tiers: list[str]) -> None:
    pull_stages(root, [stage_name(t) for t in tiers])


def repro_stages(root: Path, stages: list[str], force: bool = False, capture: bool = False) -> None:
    """`dvc repro` these dvc.yaml stages (e.g. `ingest@sim-metaworld`, `flow@multi-robot`)."""
    _dvc(["repro", *stages] + (["--force"] if force else []), root, capture=capture)


def push_stages(root: Path, stages: list[str], capture: bool = False) -> None:
    _dvc(["push", "--remote", REMOTE_NAME, *stages], root, capture=capture)


def pull_stages(root: Path, stages: list[str], capture: bool = False) -> None:
    _dvc(["pull", "--remote", REMOTE_NAME, *stages], root, capture=capture)


def locked_hashes(root: Path) -> dict[str, str]:
    """tier -> DVC hash of its folder, from dvc.lock (what lineage records)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    out = {}
    for name, stage in (data.get("stages") or {}).items():
        if not name.startswith("ingest@"):
            continue
        for o in stage.get("outs", []):
            out[name.split("@", 1)[1]] = o.get("md5", "")
    return out


def dvc_root(folder: Path) -> Path | None:
    """The DVC project a folder belongs to: the nearest folder above it with `.dvc/` (None if unversioned)."""
    for base in (Path(folder).resolve(), *Path(folder).resolve().parents):
        if (base / ".dvc").is_dir():
            return base
    return None


def locked_hash(folder: Path) -> str | None:
    """DVC's md5 of a versioned folder (a tier or a feature), from its project's dvc.lock; None if unversioned.

    Found from the folder itself, never from the current directory: a job may run anywhere.
    """
    root = dvc_root(folder)
    if root is None or not (root / "dvc.lock").is_file():
        return None
    target = Path(folder).resolve()
    data = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    for stage in (data.get("stages") or {}).values():
        for o in stage.get("outs", []):
            if o.get("md5") and (root / o.get("path", "")).resolve() == target:
                return o["md5"]
    return None


def stale_tiers(root: Path, cloud: bool = False) -> dict[str, Any]:
    """`dvc status` as data: which stages changed locally, or (cloud=True) what the remote lacks."""
    args = ["status", "--json"] + (["--cloud", "--remote", REMOTE_NAME] if cloud else [])
    proc = _dvc(args, root, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()}
    try:
        return json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        return {"error": proc.stdout.strip()}
