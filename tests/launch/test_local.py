"""The `local` launcher: the worker command and environment for one process and for several."""

from pathlib import Path

from motus.contracts import JobSpec
from motus.launch.launcher import Launcher
from motus.launch.local import LocalLauncher, command, environment


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
