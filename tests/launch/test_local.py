"""The `local` launcher: the worker command and environment for one process and for several."""

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
