"""The `local` launcher: the job spec's processes on this machine, under torchrun."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .spec import JobSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(spec: JobSpec, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.procs_per_node}",
            "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
            "-m", "motus.launch.worker", *spec.worker_args()]


def environment(spec: JobSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # run the installed `motus`, never a `motus/` folder that happens to sit in the working directory
    env.setdefault("PYTHONSAFEPATH", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        cuda = False
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.procs_per_node)))
    env.update(spec.env)
    return env


def run_local(spec: JobSpec, *, stdout=None) -> int:
    """Run the job to completion; returns its exit code. Ctrl-C / SIGTERM reach every process of the job."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(command(spec), env=environment(spec), start_new_session=True, stdout=stdout,
                            stderr=subprocess.STDOUT if stdout else None)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
