"""One job per run folder.

A job holds `<run_dir>/job.lock` while it runs: an OS file lock (`flock`), which the kernel releases when the
holder dies however it dies, so the lock of a dead holder is simply taken over, never judged stale by its age.
The holder writes who it is (pid, host, start time, command) into the file, so a refusal names it. Two jobs in
one folder would write each other's checkpoints; the second is refused before it builds anything.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

LOCK_FILE = "job.lock"


class RunFolderBusy(ValueError):
    """Another live job holds the run folder."""


def _describe(run_dir: Path, info: dict[str, Any]) -> str:
    who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    since = f" since {info['started']}" if info.get("started") else ""
    cmd = f" ({info['command']})" if info.get("command") else ""
    return (f"run folder {run_dir} is in use by {who}{since}{cmd}: wait for that job, stop it, or pass another "
            f"--run-dir")


def _read(f: IO[str]) -> dict[str, Any]:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {}


def holder(run_dir: Path) -> dict[str, Any] | None:
    """Who holds the run folder now, or None when no live job does."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    with open(path, "a+") as f:  # a+: never truncate what the holder wrote
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(f)
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


# A job that was just killed may take a moment to let go (its workers exiting): waited for this long, bounded, so
# that a retry right after a kill is not refused by the job it replaces.
RELEASE_WAIT_S = 5.0


def refuse_if_busy(run_dir: Path, wait_s: float | None = None) -> None:
    """RunFolderBusy naming the holder when a live job holds `run_dir` (a launcher's check before starting one)."""
    deadline = time.monotonic() + (RELEASE_WAIT_S if wait_s is None else wait_s)
    while (info := holder(run_dir)) is not None:
        if time.monotonic() >= deadline:
            raise RunFolderBusy(_describe(Path(run_dir), info))
        time.sleep(0.1)


class RunFolderLock:
    """Held by a job (its rank 0) from before it builds anything until it exits."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._f: IO[str] | None = None

    def acquire(self, wait_s: float | None = None) -> RunFolderLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the job's lifetime
        deadline = time.monotonic() + (RELEASE_WAIT_S if wait_s is None else wait_s)
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    info = _read(f)
                    f.close()
                    raise RunFolderBusy(_describe(self.run_dir, info)) from None
                time.sleep(0.1)
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "command": " ".join(sys.argv[:4])[:200]}, f)
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None
