"""The `local` launcher: the job spec's processes on this machine, under torchrun."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ..contracts import JobSpec
from ..train.run_lock import refuse_if_busy
from .launcher import FAILED, KILLED, SUCCEEDED, JobHandle, JobOutcome
from .runner import Runners, warm_command

GUARD = Path(__file__).with_name("guard.py")

# Ports for a job's rendezvous are drawn below the kernel's ephemeral range. The port is picked here but bound
# seconds later by the job (after its imports); a port from the ephemeral range can be taken in between as the
# local end of any outgoing connection on the machine (a tracking client's, a data download's) and the job dies of
# EADDRINUSE. A port outside that range is only ever taken by an explicit bind, which the check below sees.
_FALLBACK_EPHEMERAL = (32768, 60999)
_LOWEST = 15000


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL


def free_port(host: str = "127.0.0.1", tries: int = 64) -> int:
    """A port on `host` that nothing listens on now, outside the ephemeral range where possible (see above);
    drawn at random so that two launchers picking at once rarely draw the same one."""
    lo, _ = _ephemeral_range()
    if lo - _LOWEST >= 1000:
        rng = random.SystemRandom()
        for _ in range(tries):
            port = rng.randrange(_LOWEST, lo)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:  # an unusual port layout: the kernel's choice, with the race described above
        s.bind((host, 0))
        return s.getsockname()[1]


def command(spec: JobSpec, port: int | None = None) -> list[str]:
    worker = ["-m", "motus.launch.worker", *spec.worker_args()]
    if spec.procs_per_node == 1:
        # one process needs no launcher: torchrun would only add a process, a torch import and a rendezvous
        # (seconds per job); the worker joins a world of one from the environment below
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.procs_per_node}",
            "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", *worker]


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
    if spec.procs_per_node == 1:  # what torchrun would have set for a world of one
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    env.update(spec.env)
    return env


class LocalLauncher:
    """The job's processes on this machine (the worker, or torchrun and its workers) in a process group of
    their own, so a cancel (or Ctrl-C / SIGTERM while waiting) reaches every one of them. `log`: a file the
    job's output is appended to (None: this terminal). `runners`: where CPU jobs are forked warm (see
    `motus.launch.runner`; None: every worker process imports cold)."""

    kind = "local"

    def __init__(self, log: Path | None = None, runners: Runners | None = None):
        self.log = Path(log) if log else None
        self.runners = runners
        self._procs: dict[str, subprocess.Popen] = {}

    def submit(self, spec: JobSpec) -> JobHandle:
        refuse_if_busy(Path(spec.run_dir))  # a live job holds that folder: say who, start nothing
        Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
        cmd, env = command(spec), environment(spec)
        note = ""
        if self.runners is not None:
            sock, why = self.runners.ensure(env)  # a job that cannot go warm starts cold, as it always did
            if sock is not None:
                cmd = warm_command(cmd, sock)
            elif why:
                note = f"motus runner: starting the job cold: {why}\n"
        out = open(self.log, "ab") if self.log else None  # noqa: SIM115 - the child holds it for its lifetime
        if note:
            out.write(note.encode()) if out else sys.stderr.write(note)
        # the guard leads the job's process group and takes it down if this process dies (see guard.py)
        cmd = [sys.executable, str(GUARD), "--parent", str(os.getpid()), "--", *cmd]
        try:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out,
                                    stderr=subprocess.STDOUT if out else None)
        finally:
            if out is not None:
                out.close()
        self._procs[str(proc.pid)] = proc
        return JobHandle(self.kind, str(proc.pid), Path(spec.run_dir))

    def wait(self, handle: JobHandle, timeout_s: float | None = None) -> JobOutcome:
        proc = self._procs[handle.name]

        def forward(signum, _frame):
            self._signal(proc, signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = proc.wait(timeout_s)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if code == 0:
            return JobOutcome(SUCCEEDED, 0)
        if code < 0 or code in (137, 143):  # killed from outside: OOM killer, preemption, Ctrl-C
            return JobOutcome(KILLED, code, f"killed (exit {code})")
        return JobOutcome(FAILED, code, f"exit {code}")

    def logs(self, handle: JobHandle) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def record(self, handle: JobHandle) -> dict[str, object]:
        return {}  # this machine: the lineage record already says what ran where

    def cancel(self, handle: JobHandle) -> None:
        proc = self._procs.get(handle.name)
        if proc is not None and proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()

    @staticmethod
    def _signal(proc: subprocess.Popen, signum: int) -> None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass


def run_local(spec: JobSpec, *, log: Path | None = None) -> int:
    """Run the job to completion on this machine; returns its exit code."""
    launcher = LocalLauncher(log=log)
    return launcher.wait(launcher.submit(spec)).exit_code
