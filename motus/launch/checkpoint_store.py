"""The object-store mirror of a run folder's checkpoints, so a job restarted anywhere resumes.

On a cluster the run folder lives on a shared ReadWriteMany volume: the checkpoint code commits a checkpoint by
renaming a folder, which needs a POSIX filesystem that every rank sees (an object store has no atomic rename).
The volume is not the durable copy, though: it can be lost, or the job can be resubmitted to another cluster.
So the Master pod runs two extra containers around the training container:

* ``restore`` (init container): when the run folder holds no complete checkpoint newer than the mirror's, pull
  the mirror's latest *complete* one into ``checkpoints/step-N`` (downloaded to a temp folder, renamed last);
* ``mirror`` (native sidecar): upload each new complete checkpoint, files first and ``manifest.json`` last,
  then ``export/`` when the job has written it; a final pass on SIGTERM.

A remote checkpoint counts as complete only when its manifest is present and every file the manifest lists
is there with its recorded size: an upload cut off half-way is never picked. Resuming is then the ordinary
local path: the same worker command on the same run folder finds the checkpoint and continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..contracts import LINEAGE_FILE
from ..train.checkpoint import (
    MANIFEST,
    CheckpointManifest,
    find_latest_complete,
    list_step_dirs,
    step_dir_name,
    verify_checkpoint,
)

log = logging.getLogger(__name__)


def split_remote(remote: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    if not remote.startswith("s3://") or len(remote) <= 5:
        raise ValueError(f"checkpoint remote must be s3://bucket[/prefix], got '{remote}'")
    bucket, _, prefix = remote[5:].partition("/")
    return bucket, prefix.strip("/")


def s3_client(endpoint_url: str | None = None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("MOTUS_S3_ENDPOINT_URL") or None)


def _key(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


def _remote_sizes(s3: Any, bucket: str, prefix: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
        for obj in page.get("Contents", []):
            sizes[obj["Key"]] = obj["Size"]
    return sizes


def remote_complete_steps(s3: Any, remote: str) -> list[int]:
    """Steps whose manifest and every listed file (with its size) are in the mirror, ascending."""
    bucket, prefix = split_remote(remote)
    root = _key(prefix, "checkpoints")
    sizes = _remote_sizes(s3, bucket, root)
    steps = []
    for key in sizes:
        rel = key[len(root) + 1:]
        name, _, rest = rel.partition("/")
        if rest != MANIFEST or not name.startswith("step-"):
            continue
        try:
            manifest = CheckpointManifest.from_dict(json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
        except (ValueError, TypeError) as e:  # a damaged mirror entry is not a complete step; say which one
            log.warning("s3://%s/%s: unreadable checkpoint manifest, step skipped (%s)", bucket, key, e)
            continue
        if all(sizes.get(_key(root, name, f)) == meta.get("bytes") for f, meta in manifest.files.items()):
            steps.append(manifest.step)
    return sorted(steps)


def push(run_dir: Path, remote: str, s3: Any) -> list[int]:
    """Upload complete checkpoints the mirror lacks (manifest last) and `export/`; returns the steps uploaded."""
    bucket, prefix = split_remote(remote)
    have = set(remote_complete_steps(s3, remote))
    uploaded = []
    for step, d in list_step_dirs(run_dir / "checkpoints"):
        # a `step-N` folder was renamed into place whole, but may have been damaged since: check sizes
        if step in have or verify_checkpoint(d, check_hashes=False):
            continue
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)
        for p in [*files, d / MANIFEST]:  # the manifest is the commit mark, so it goes last
            s3.upload_file(str(p), bucket, _key(prefix, "checkpoints", d.name, p.relative_to(d).as_posix()))
        uploaded.append(step)
    export = run_dir / "export"
    done = _key(prefix, "export", LINEAGE_FILE)
    if (export / LINEAGE_FILE).is_file() and done not in _remote_sizes(s3, bucket, _key(prefix, "export")):
        files = sorted(q for q in export.rglob("*") if q.is_file() and q.name != LINEAGE_FILE)
        for p in [*files, export / LINEAGE_FILE]:  # the lineage record last: the export's commit mark
            s3.upload_file(str(p), bucket, _key(prefix, "export", p.relative_to(export).as_posix()))
    return uploaded


def pull_latest(run_dir: Path, remote: str, s3: Any) -> int | None:
    """Bring the mirror's latest complete checkpoint into `run_dir/checkpoints` unless a newer or equal one is
    already there; returns the step now present locally (None: nothing anywhere, a fresh start)."""
    bucket, prefix = split_remote(remote)
    ckpts = run_dir / "checkpoints"
    local = find_latest_complete(ckpts) if ckpts.is_dir() else None
    local_step = int(local.name.split("-")[1]) if local else None
    steps = remote_complete_steps(s3, remote)
    if not steps or (local_step is not None and local_step >= steps[-1]):
        return local_step
    step = steps[-1]
    name = step_dir_name(step)
    root = _key(prefix, "checkpoints", name)
    tmp = ckpts / f".tmp-{name}-restore"
    shutil.rmtree(tmp, ignore_errors=True)
    for key in _remote_sizes(s3, bucket, root):
        dest = tmp / key[len(root) + 1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(dest))
    os.replace(tmp, ckpts / name)  # complete on disk only once every file is there
    (ckpts / "latest.tmp").write_text(name)
    os.replace(ckpts / "latest.tmp", ckpts / "latest")
    log.info("restored %s from %s", name, remote)
    return step


def mirror(run_dir: Path, remote: str, s3: Any, interval: float = 60.0) -> None:
    """Push every `interval` seconds until SIGTERM/SIGINT, then push once more and return."""
    stop = False

    def _stop(_sig, _frame):
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    while True:
        try:
            for step in push(run_dir, remote, s3):
                log.info("mirrored step %d to %s", step, remote)
        except Exception as e:  # noqa: BLE001 - a flaky store must not kill the training pod; retry next round
            log.warning("mirror to %s failed, retrying: %s", remote, e)
        if stop:
            return
        deadline = time.monotonic() + interval
        while not stop and time.monotonic() < deadline:
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="motus.launch.checkpoint_store", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["restore", "mirror", "push"])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--remote", required=True, help="s3://bucket/prefix of this run's mirror")
    ap.add_argument("--interval", type=float, default=60.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    s3 = s3_client()
    if args.action == "restore":
        step = pull_latest(args.run_dir, args.remote, s3)
        print(json.dumps({"resume_step": step}))
    elif args.action == "push":
        print(json.dumps({"uploaded": push(args.run_dir, args.remote, s3)}))
    else:
        mirror(args.run_dir, args.remote, s3, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
