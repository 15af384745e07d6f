"""DVC versioning of tiers: `dvc repro` the per-tier stages, push them to the configured remote, read hashes.

The remote comes from the environment (MOTUS_DATA_REMOTE: a local folder by default, `s3://bucket/prefix`
in production, MOTUS_S3_ENDPOINT_URL for S3-compatible stores) and is written to `.dvc/config.local`, so
a machine's remote never leaks into the committed DVC config. The tier hash lineage records is the DVC
hash of the tier folder (the `md5` of its `.dir` entry in dvc.lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REMOTE_NAME = "motus"
# what `dvc status` last said of the ingest stages, and the state of the files it read (see stale_ingest_stages)
STATUS_CACHE = Path(".dvc") / "tmp" / "motus-ingest-status.json"


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


def configure_cache(root: Path, cache_type: str) -> None:
    """How DVC puts a tier into its cache (`.dvc/config.local`: the machine's choice, like its remote), set only
    when it differs (a `dvc config` costs DVC's start-up). `reflink,copy` (the default) shares the blocks where the
    filesystem can (XFS, btrfs: instant, and a later write to the tier copies first) and copies elsewhere;
    `hardlink` skips the copy on any filesystem (measured: versioning a 10^6-episode tier 2.6x -> 1.2-1.7x the time
    of `tar | md5sum`) but the tier's files then *are* the cache's: DVC makes them read-only, yet a process
    running as root that rewrites one in place corrupts the cached version too. Motus itself never writes into
    a built tier or feature (it builds a new folder and renames it), so `hardlink` is safe for its own writes."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(root / ".dvc" / "config.local")
    if cfg.get("cache", "type", fallback="reflink,copy") != cache_type:  # DVC's own default when unset
        _dvc(["config", "--local", "cache.type", cache_type], root)


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


def _read_lock(root: Path) -> dict[str, Any]:
    """dvc.lock as data ({} when there is none); libyaml's parser where PyYAML has it: the lock of a project
    with many stages is thousands of lines, and the pure-Python parser takes a noticeable part of a second."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    return yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def locked_hashes(root: Path) -> dict[str, str]:
    """tier -> DVC hash of its folder, from dvc.lock (what lineage records)."""
    data = _read_lock(root)
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


def _files_state(root: Path, rel: str) -> list[list[Any]]:
    """(path, size, mtime_ns, inode) of a file, or of every file under a folder: what tells DVC's own state
    database that a file is unchanged without hashing it."""
    top = root / rel
    if top.is_file():
        found = [top]
    elif top.is_dir():
        found = sorted(Path(d) / f for d, _, files in os.walk(top) for f in files)
    else:
        return [[rel, None]]
    out = []
    for f in found:
        st = f.stat()
        out.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def _ingest_status_key(root: Path, lock: dict[str, Any]) -> str:
    """A digest of everything `dvc status` reads to judge the `ingest@` stages: the stage definitions, the lock,
    the params files, DVC's config and ignore rules, each locked stage's deps and outs (by stat, as DVC's
    state database does; a tier's shards are never read), and the DVC version."""
    from importlib.metadata import PackageNotFoundError, version

    paths = {"dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/config.local"}
    for name, stage in (lock.get("stages") or {}).items():
        if name.startswith("ingest@"):
            paths.update(e["path"] for e in [*stage.get("deps", []), *stage.get("outs", [])] if "path" in e)
            paths.update(stage.get("params") or {})
    try:
        dvc_version = version("dvc")
    except PackageNotFoundError:
        dvc_version = None
    state = [dvc_version, sys.executable, *(entry for rel in sorted(paths) for entry in _files_state(root, rel))]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()


def stale_ingest_stages(root: Path) -> set[str]:
    """The `ingest@<tier>` stages `dvc status` reports changed since their last `dvc repro`.

    DVC takes about a second to start and look before it answers, whatever the tiers' size; so its answer
    is kept (in .dvc/tmp) with a digest of every file it depends on, and given again, without DVC, while
    none of those files has changed. Without a dvc.yaml there is no such stage to ask about. A `dvc status`
    that fails says nothing is stale, as before, and is not kept."""
    if not (root / "dvc.yaml").is_file():
        return set()
    key = _ingest_status_key(root, _read_lock(root))
    cache = root / STATUS_CACHE
    try:
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            return set(kept["changed"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    answer = stale_tiers(root)
    changed = {name for name in answer if name.startswith("ingest@")}
    if "error" not in answer:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "changed": sorted(changed)}))
            os.replace(tmp, cache)  # whole or not at all: another status may be reading it
        except OSError:
            pass  # a read-only project: ask DVC every time
    return changed
