"""The `local` launcher: the worker command and environment for one process and for several."""

import os
import socket
from pathlib import Path

from motus.contracts import JobSpec
from motus.launch.launcher import Launcher
from motus.launch.local import LocalLauncher, _ephemeral_range, command, environment, free_port


def test_one_process_runs_the_worker_directly_several_run_under_torchrun():
    one = JobSpec(stage="stage1", run_dir=Path("r"), params_file=Path("p.yaml"))
    cmd = command(one)
    assert "torch.distributed.run" not in cmd and cmd[1:3] == ["-m", "motus.launch.worker"]
    env = environment(one)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "1", "127.0.0.1")
    assert int(env["MASTER_PORT"]) > 0
    two = one.with_updates(procs_per_node=2)
    cmd = command(two, port=29512)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd
    assert "--master_port=29512" in cmd and cmd[cmd.index("motus.launch.worker") + 1:] == two.worker_args()
    assert isinstance(LocalLauncher(), Launcher)


def test_a_failed_and_a_killed_job_are_told_apart(tmp_path, monkeypatch):
    """The outcome a pipeline retries on (killed from outside) is not the one it stops on (the job failed)."""
    import sys

    import motus.launch.local as local

    spec = JobSpec(stage="stage1", run_dir=tmp_path / "run", params_file=tmp_path / "p.yaml")
    launcher = LocalLauncher(log=tmp_path / "job.log")
    monkeypatch.setattr(local, "command", lambda s, port=None: [sys.executable, "-c", "print('bad config'); raise SystemExit(2)"])
    handle = launcher.submit(spec)
    failed = launcher.wait(handle)
    assert (failed.state, failed.exit_code, failed.ok) == ("Failed", 2, False)
    assert "bad config" in launcher.logs(handle)
    monkeypatch.setattr(local, "command", lambda s, port=None: [sys.executable, "-c", "import time; time.sleep(60)"])
    handle = launcher.submit(spec)
    launcher.cancel(handle)
    killed = launcher.wait(handle)
    assert killed.state == "Killed" and not killed.ok
    monkeypatch.setattr(local, "command", lambda s, port=None: [sys.executable, "-c", "pass"])
    assert launcher.wait(launcher.submit(spec)).ok


def test_the_worker_reads_the_submitted_spec_and_nothing_else(tmp_path):
    """Every launcher passes the JobSpec itself; its env travels as the environment, never on a command line."""
    import json
    import subprocess
    import sys

    spec = JobSpec(stage="stage3", run_dir=tmp_path / "r", params_file=tmp_path / "p.yaml", init_from="models:/m/2",
                   max_steps=5, precision="bf16", track=False, env={"MOTUS_TOKEN": "secret-value"})
    args = spec.worker_args()
    assert args[0] == "--spec" and "secret-value" not in " ".join(args)
    assert JobSpec.from_json(json.loads(args[1])) == spec.for_worker()
    assert spec.for_worker() == spec.with_updates(env={})  # placement: this spec has the defaults
    assert environment(spec)["MOTUS_TOKEN"] == "secret-value"
    run = lambda *a: subprocess.run([sys.executable, "-m", "motus.launch.worker", *a],  # noqa: E731
                                    capture_output=True, text=True)
    mixed = run(*args, "--max-steps", "9")
    assert mixed.returncode == 2 and "--spec carries the whole job; drop --max-steps" in mixed.stderr
    nofile = run("--spec", f"@{tmp_path / 'none.json'}")
    assert nofile.returncode == 2 and "--spec: [Errno 2] No such file" in nofile.stderr
    bad = run("--spec", json.dumps({"stage": "stage3"}))
    assert bad.returncode == 2 and "--spec: --spec: missing 'run_dir'" in bad.stderr
    missing = run(*args)  # a well-formed spec whose params file does not exist: named, not a traceback
    assert missing.returncode == 2 and f"error: {tmp_path / 'p.yaml'}: file not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_rendezvous_port_is_free_and_outside_the_range_outgoing_connections_take(monkeypatch):
    """The job binds its port seconds after the launcher picked it; only a port outside the ephemeral range
    cannot be taken in between by an outgoing connection (the EADDRINUSE a loaded CI once hit)."""
    import motus.launch.local as local

    lo, hi = _ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(not lo <= p <= hi and p >= 1024 for p in ports) and len(ports) > 1
    held, other = sorted(ports)[:2]
    draws = iter([held, held, other])

    class Rigged:  # the draw lands on a port something listens on: it is skipped, not handed out
        def randrange(self, a, b):
            return next(draws)

    monkeypatch.setattr(local.random, "SystemRandom", Rigged)
    with socket.socket() as s:
        s.bind(("127.0.0.1", held))
        s.listen()
        assert free_port() == other


GUARDED = """
import sys
from pathlib import Path

import motus.launch.local as local
from motus.contracts import JobSpec

run_dir = Path(sys.argv[1])
job = ("import subprocess, sys, time; "
       "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
       "print('grandchild', p.pid, flush=True); time.sleep(600)")
local.command = lambda spec, port=None: [sys.executable, "-c", job]
launcher = local.LocalLauncher(log=run_dir / "job.log")
handle = launcher.submit(JobSpec(stage="stage1", run_dir=run_dir, params_file=Path("p.yaml")))
print(handle.name, flush=True)
launcher.wait(handle)
"""


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a dead child nobody reaped yet is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def test_killing_the_launcher_takes_the_whole_job_down(tmp_path):
    """A job runs in a process group of its own (so a cancel reaches all of it); SIGKILL to the launcher's group
    must not leave it running: the guard leading the job's group stops it, grandchildren included."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "launch.py"
    script.write_text(GUARDED)
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    guard = int(launcher.stdout.readline())
    log = tmp_path / "run" / "job.log"
    deadline = time.time() + 60
    while "grandchild" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.05)
    grandchild = int(log.read_text().split("grandchild")[1].split()[0])
    assert os.getpgid(grandchild) == guard  # the job's tree is in the guard's group, not the launcher's
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 15
    while _alive(guard) or _alive(grandchild):
        assert time.time() < deadline, "the job outlived its launcher"
        time.sleep(0.1)
    assert "the launcher (pid" in log.read_text() and "stopping the job's process group" in log.read_text()


def test_a_second_job_on_a_locked_run_folder_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
        tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    import pytest

    import motus.train.run_lock as run_lock
    from motus.train.checkpoint import remove_leftovers
    from motus.train.run_lock import RunFolderBusy, RunFolderLock, holder

    monkeypatch.setattr(run_lock, "RELEASE_WAIT_S", 0.5)  # how long a dying holder is given before a refusal

    run_dir = tmp_path / "run"
    spec = JobSpec(stage="stage1", run_dir=run_dir, params_file=tmp_path / "p.yaml")
    lock = RunFolderLock(run_dir).acquire()
    assert holder(run_dir)["pid"] == os.getpid()
    t0 = time.monotonic()
    with pytest.raises(RunFolderBusy, match=rf"run folder {run_dir} is in use by pid {os.getpid()} on "):
        LocalLauncher().submit(spec)
    assert 0.5 <= time.monotonic() - t0 < 5
    with pytest.raises(RunFolderBusy):
        RunFolderLock(run_dir).acquire()
    lock.release()
    assert holder(run_dir) is None
    # a holder killed with SIGKILL leaves its file behind, but not its lock: the next job takes over
    code = (f"from motus.train.run_lock import RunFolderLock; import os, signal; "
            f"RunFolderLock({str(run_dir)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert (run_dir / "job.lock").read_text() and holder(run_dir) is None
    RunFolderLock(run_dir).acquire().release()
    # what a save that never finished leaves is removed by the next holder
    for name in (".tmp-step-000004-ab12", ".tmp-step-000008-cd34-replaced"):
        (run_dir / "checkpoints" / name).mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000002").mkdir()
    assert [p.name for p in remove_leftovers(run_dir / "checkpoints")] == [".tmp-step-000004-ab12",
                                                                           ".tmp-step-000008-cd34-replaced"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
