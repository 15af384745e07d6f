"""The warm runner: local CPU jobs forked from a process that has already imported what every job imports.

A cold job process spends most of a tiny job's time importing torch, DeepSpeed, diffusers and MLflow (about
8 s of CPU, measured on a 2-core machine, against well under a second of training steps). A runner imports
them once and forks one child per job process; the child takes the job's arguments, environment, working
directory and standard streams and runs `motus.launch.worker` exactly as a cold process would (a test trains
one job both ways and compares every loss bit for bit).

Three pieces, all in this module (which imports nothing heavy, so the job process in the middle is cheap):

- `Runners`, the launcher's side: finds or starts the runner for a job's environment. The runner's key covers
  the interpreter, the installed packages, the motus sources and the environment read at import time, so an
  edited source file or an upgraded package gets a new runner, never a stale one.
- `serve` (`python -m motus.launch.runner serve --socket S`): imports, then listens on a Unix socket, forks
  one child per request, sends each child's exit status back, and exits after `--idle` seconds without jobs
  or on SIGTERM (after its running jobs end).
- `run` (`python -m motus.launch.runner run --socket S -- WORKER ARGS`): the job process the launcher starts
  in the worker's place. It lives as long as the job: it forwards the signals it gets to the job, exits with
  the job's status, and when it is killed (kill -9, a cancelled pipeline) the job kills itself. To the
  launcher, torchrun and `kill` a job is still one process tree whose command line names its run folder.
  Whenever the runner cannot serve (never started, died, refuses) it execs the worker cold and says why.

Only CPU jobs go warm (the launcher checks the job's `DS_ACCELERATOR=cpu`): a CUDA context does not survive
fork(), and GPU jobs are long enough that their imports do not matter. `MOTUS_WARM_JOBS=false` turns it off.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

WORKER = "motus.launch.worker"
RUNNER = "motus.launch.runner"
# environment read while the runner imports (so it must match the job's); everything else is the job's own,
# applied after the fork: OMP_NUM_THREADS (the trainer sets the thread count from it), TORCH_EXTENSIONS_DIR
# (read when DeepSpeed loads an op), PYTHONUNBUFFERED (the child re-buffers its streams)
IMPORT_ENV_PREFIXES = ("PYTHON", "DS_", "TORCH", "HF_", "TRANSFORMERS_", "DIFFUSERS_", "CUDA", "LD_", "MKL_")
JOB_ONLY_ENV = {"PYTHONUNBUFFERED", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR"}
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
MAX_SOCKET_PATH = 96  # AF_UNIX paths are limited to 107 bytes (the runner binds `<socket>.<pid>` first)
CONNECT_WAIT_S = 300.0  # a runner importing on a busy machine; its process is checked while waiting


def default_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"motus-runners-{os.getuid()}"


# ------------------------------------------------------------------------------------------ the launcher side


def import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(env.items()) if k.startswith(IMPORT_ENV_PREFIXES) and k not in JOB_ONLY_ENV}


def runner_key(env: dict[str, str]) -> str:
    """What a runner's imports depend on: the interpreter, the installed packages (their folders' mtimes change
    with every install), every motus source file, and the import-time environment; and the caller's
    scheduling priority, which forked jobs inherit from the runner (a job launched at normal priority must not
    run `nice`d because a background caller happened to start the runner)."""
    import motus

    h = hashlib.sha256(sys.executable.encode())
    h.update(f"nice={os.getpriority(os.PRIO_PROCESS, 0)}".encode())
    for p in sorted({p for p in sys.path if p.endswith("-packages")}):
        with contextlib.suppress(OSError):
            h.update(f"{p}:{os.stat(p).st_mtime_ns}".encode())
    package = Path(motus.__file__).parent
    for f in sorted(package.rglob("*.py")):
        st = f.stat()
        h.update(f"{f.relative_to(package)}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(import_env(env)).encode())
    return h.hexdigest()[:24]


def _runner_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is alive and is a runner (a reused pid is not)."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    if not alive(pid):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            if RUNNER.encode() not in cmdline.read_bytes():
                return None
        except OSError:
            return None
    return pid


class Runners:
    """Finds or starts the warm runner for a job's environment. `folder` holds each runner's socket, pid file
    and log (`<key>.sock|.pid|.log`); `idle_s`: a runner exits after that long without jobs."""

    def __init__(self, folder: Path | None = None, idle_s: float = 120.0):
        self.folder = Path(folder) if folder else default_dir()
        self.idle_s = idle_s

    @classmethod
    def from_settings(cls, settings: Any) -> Runners | None:
        if not getattr(settings, "warm_jobs", False):
            return None
        return cls(settings.runner_dir, settings.runner_idle_s)

    def ensure(self, env: dict[str, str]) -> tuple[Path | None, str]:
        """(socket, "") of the runner for `env`, started if none is running; (None, "") for a job that is not a
        CPU job on Linux (a CUDA context does not survive fork); (None, why) when no runner can serve it."""
        if env.get("DS_ACCELERATOR") != "cpu" or not sys.platform.startswith("linux"):
            return None, ""  # (fork, SCM_RIGHTS and /proc as used here: Linux only)
        key = runner_key(env)
        sock = self.folder / f"{key}.sock"
        if len(str(sock)) > MAX_SOCKET_PATH:
            return None, f"socket path {sock} is longer than a Unix socket allows; set MOTUS_RUNNER_DIR shorter"
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            import fcntl

            with open(self.folder / f"{key}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # two launchers at once start one runner
                if _runner_pid(sock.with_suffix(".pid")) is None:
                    self._start(sock, env)
        except OSError as e:
            return None, f"cannot start a runner in {self.folder}: {e}"
        return sock, ""

    def _start(self, sock: Path, env: dict[str, str]) -> None:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # a dead runner's
        with open(sock.with_suffix(".log"), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", RUNNER, "serve", "--socket", str(sock),
                                     "--idle", str(self.idle_s)], env=env, cwd=self.folder,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        sock.with_suffix(".pid").write_text(str(proc.pid))

    def running(self) -> list[tuple[int, Path]]:
        """(pid, socket) of every live runner in the folder."""
        out = []
        for pid_file in sorted(self.folder.glob("*.pid")):
            pid = _runner_pid(pid_file)
            if pid is not None:
                out.append((pid, pid_file.with_suffix(".sock")))
        return out

    def stop(self, timeout_s: float = 60.0) -> list[int]:
        """SIGTERM every runner in the folder (each finishes its running jobs first) and wait for them."""
        pids = [pid for pid, _ in self.running()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for pid in pids:
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.05)
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return pids


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, exited but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    try:  # a zombie (exited, not yet reaped by the launcher that started it) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] != "Z"
    except FileNotFoundError:  # ended meanwhile
        return False
    except (OSError, IndexError):  # no /proc here
        return True


def warm_command(cmd: list[str], sock: Path) -> list[str]:
    """`cmd` (the local launcher's: the worker, or torchrun and the worker) with the worker replaced by the
    warm runner's job process; a command without the worker is returned unchanged."""
    for i in range(len(cmd) - 1):
        if cmd[i] == "-m" and cmd[i + 1] == WORKER:
            return [*cmd[:i], "-m", RUNNER, "run", "--socket", str(sock), "--", *cmd[i + 2:]]
    return cmd


# ------------------------------------------------------------------------------------------ the wire
# Messages are a 4-byte length and a JSON object; the request carries the job's stdin/out/err as SCM_RIGHTS.


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    body = json.dumps(message).encode()
    head = len(body).to_bytes(4, "big")
    if fds:
        socket.send_fds(conn, [head], fds)
    else:
        conn.sendall(head)
    conn.sendall(body)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _recv(conn: socket.socket, with_fds: bool = False) -> tuple[dict | None, list[int]]:
    fds: list[int] = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(conn, 4, 3)
        if not head:
            return None, fds
        rest = _recv_exact(conn, 4 - len(head)) if len(head) < 4 else b""
        if rest is None:
            return None, fds
        head += rest
    else:
        head = _recv_exact(conn, 4)
        if head is None:
            return None, fds
    body = _recv_exact(conn, int.from_bytes(head, "big"))
    return (json.loads(body) if body is not None else None), fds


# ------------------------------------------------------------------------------------------ the runner


def preload() -> None:
    """Everything a job process imports before its first step (measured: ~7 s of a cold job's 8 s)."""
    import deepspeed  # noqa: F401
    import mlflow  # noqa: F401

    from ..track import MlflowTracker  # noqa: F401
    from ..train import latent_action, stage  # noqa: F401
    from . import worker  # noqa: F401


def unsafe_to_fork() -> str:
    """Why forking this process would hand a child broken state ("" if it would not)."""
    import threading

    import torch

    if torch.cuda.is_initialized():
        return "CUDA is initialised in the runner"
    if threading.active_count() > 1:
        return f"the runner has threads ({', '.join(t.name for t in threading.enumerate())})"
    return ""


def serve(sock: Path, idle_s: float) -> int:
    t0 = time.monotonic()
    preload()
    why = unsafe_to_fork()
    if why:
        print(f"motus runner: not serving: {why}", flush=True)
        return 3
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = sock.with_name(f"{sock.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    listener.bind(str(staging))
    listener.listen(64)
    os.replace(staging, sock)  # the socket appears only once the imports are done: a client never waits inside
    inode = sock.stat().st_ino
    print(f"motus runner {os.getpid()}: ready in {time.monotonic() - t0:.1f} s on {sock}", flush=True)
    stopping = False

    def stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    jobs: dict[int, socket.socket] = {}
    last = time.monotonic()
    while True:
        for pid, status in _reaped(jobs):
            with contextlib.suppress(OSError):
                _send(jobs[pid], status)
            jobs.pop(pid).close()
            last = time.monotonic()
        if not jobs and time.monotonic() - last > idle_s:
            stopping = True
        if stopping and listener.fileno() >= 0:
            # no longer serving: the socket and the pid file go now, not when the last job ends, so the next
            # launcher starts a new runner instead of waiting on this one
            listener.close()
            with contextlib.suppress(OSError):
                if sock.stat().st_ino == inode:  # not a newer runner's
                    sock.unlink()
            pid_file = sock.with_suffix(".pid")
            with contextlib.suppress(OSError, ValueError):
                if int(pid_file.read_text()) == os.getpid():
                    pid_file.unlink()
        if stopping and not jobs:
            print(f"motus runner {os.getpid()}: stopped", flush=True)
            return 0
        ready = []
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([listener] if listener.fileno() >= 0 else [], [], [], 0.1)
        if ready:
            conn, _ = listener.accept()
            pid = _fork_job(conn, listener, jobs)
            if pid is not None:
                jobs[pid] = conn
                last = time.monotonic()


def _reaped(jobs: dict[int, socket.socket]) -> list[tuple[int, dict]]:
    out = []
    for pid in list(jobs):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            out.append((pid, {"lost": True}))
            continue
        if done:
            out.append((pid, {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                          else {"exit": os.WEXITSTATUS(status)}))
    return out


def _fork_job(conn: socket.socket, listener: socket.socket, jobs: dict[int, socket.socket]) -> int | None:
    conn.settimeout(30)
    try:
        request, fds = _recv(conn, with_fds=True)
    except (OSError, ValueError):
        request, fds = None, []
    conn.settimeout(None)
    if request is None or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    why = unsafe_to_fork()
    if why:
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            _send(conn, {"error": why})
        conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    # a signal forwarded the instant the job starts must find the job's handlers, not the runner's: held from
    # before the fork until the child has reset them
    held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pid = os.fork()
    if pid == 0:
        _job(conn, fds, request, [listener, *jobs.values()], held)  # never returns
    signal.pthread_sigmask(signal.SIG_SETMASK, held)
    for fd in fds:
        os.close(fd)
    try:
        _send(conn, {"pid": pid, "runner": os.getpid()})
    except OSError:
        pass  # the job process is gone already; the child notices and ends itself
    return pid


def _job(conn: socket.socket, fds: list[int], request: dict, inherited: list[socket.socket],
         mask: set[signal.Signals]) -> None:
    """The forked child: become the job process the request describes, run the worker, exit with its code."""
    code = 1
    try:
        os.setsid()  # its own process group: a forwarded signal reaches the job and whatever it starts
        _name_process(b"motus-job")
        for s in inherited:
            s.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile is delivered now
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [sys.executable, *request["args"]]
        _job_streams()
        _fresh_randomness()
        import threading

        threading.Thread(target=_die_with_job_process, args=(conn,), name="job-process-watch", daemon=True).start()
        from .worker import main

        code = main(request["args"])
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 - what a cold process would print before exiting 1
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # what the job registered (MLflow's flushes), as a normal exit would run
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code & 0xFF)


def _name_process(name: bytes) -> None:
    """What `ps -o comm`/`top` show for the forked job (its command line stays the runner's)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def _job_streams() -> None:
    """sys.stdout/stderr over the job's descriptors, buffered as a cold interpreter with this environment would
    buffer them (PYTHONUNBUFFERED: not at all; stdout line-buffered on a terminal only)."""
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for fd, name in ((1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        raw = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)  # noqa: SIM115 - the process's own
        setattr(sys, name, io.TextIOWrapper(raw, encoding=old.encoding, errors=old.errors,
                                            line_buffering=fd == 2 or os.isatty(fd), write_through=unbuffered))


def _fresh_randomness() -> None:
    """A cold process starts with fresh numpy entropy and torch's default seed; a fork would share the
    runner's. (Python's `random` reseeds itself after fork.)"""
    import numpy as np
    import torch

    np.random.seed(int.from_bytes(os.urandom(4), "big"))
    torch.manual_seed(torch.initial_seed())


def _die_with_job_process(conn: socket.socket) -> None:
    """The job process never writes to its socket; when it closes (it ended, or was killed) so does the job."""
    with contextlib.suppress(OSError):
        while conn.recv(1):
            pass
    os.killpg(0, signal.SIGKILL)


# ------------------------------------------------------------------------------------------ the job process


def run(sock: Path, args: list[str]) -> int:
    """The job process: have the runner fork the worker with this process's environment and streams, then
    stand in for it (signals in, exit status out). Falls back to a cold worker when the runner cannot."""
    try:
        conn = _connect(sock)
        _send(conn, {"args": args, "env": dict(os.environ), "cwd": os.getcwd()}, [0, 1, 2])
        reply, _ = _recv(conn)
    except (OSError, RunnerUnavailable) as e:
        return _cold(args, str(e))
    if reply is None or "pid" not in reply:
        return _cold(args, (reply or {}).get("error", "the runner closed the connection"))
    pid = reply["pid"]
    print(f"motus runner: job process {pid} forked from runner {reply['runner']}", file=sys.stderr, flush=True)
    forwarded: list[int] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        try:
            os.killpg(pid, signum)  # the job and whatever it started
        except ProcessLookupError:  # just forked, not yet its own group: it holds signals until it is
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for s in FORWARDED:
        signal.signal(s, forward)
    status, _ = _recv(conn)
    if status is None or status.get("lost"):
        print(f"motus runner: the runner ended before job process {pid} reported its status", file=sys.stderr)
        return 128 + forwarded[-1] if forwarded else 1
    if "signal" in status:  # end the way the job ended, so the launcher reads the same wait status
        signal.signal(status["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
        return 128 + status["signal"]
    return int(status["exit"])


class RunnerUnavailable(Exception):
    pass


def _connect(sock: Path) -> socket.socket:
    pid_file = sock.with_suffix(".pid")
    deadline = time.monotonic() + float(os.environ.get("MOTUS_RUNNER_WAIT_S", CONNECT_WAIT_S))
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(sock))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
        if _runner_pid(pid_file) is None:
            raise RunnerUnavailable(f"no runner is serving {sock} (its log: {sock.with_suffix('.log')})")
        if time.monotonic() > deadline:
            raise RunnerUnavailable(f"the runner for {sock} was not ready within the wait")
        time.sleep(0.05)


def _cold(args: list[str], why: str) -> int:
    print(f"motus runner: starting the job cold: {why}", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", WORKER, *args])
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {RUNNER}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="Import, then fork the jobs that ask, until idle.")
    s.add_argument("--socket", type=Path, required=True)
    s.add_argument("--idle", type=float, default=120.0, help="Seconds without jobs before the runner exits.")
    r = sub.add_parser("run", help="Run one worker process through the runner (what the launcher starts).")
    r.add_argument("--socket", type=Path, required=True)
    r.add_argument("args", nargs=argparse.REMAINDER, help="-- then the worker's arguments")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.socket, args.idle)
    worker_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    return run(args.socket, worker_args)


if __name__ == "__main__":
    sys.exit(main())
