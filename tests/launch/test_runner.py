"""The warm runner's contracts: which command a warm job runs, and when a job gets a new runner, an old one, or
none (tests/train/test_warm_runner.py runs real jobs through one)."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from motus.contracts import JobSpec
from motus.launch.local import command
from motus.launch.runner import RUNNER, WORKER, Runners, runner_key, warm_command

CPU = {"DS_ACCELERATOR": "cpu", "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "2"}


def test_warm_command_replaces_the_worker_and_keeps_torchrun():
    spec = JobSpec(stage="stage1", run_dir=Path("r"), params_file=Path("p.yaml"))
    sock = Path("/tmp/x.sock")
    one = warm_command(command(spec), sock)
    assert one == [sys.executable, "-m", RUNNER, "run", "--socket", str(sock), "--", *spec.worker_args()]
    two = warm_command(command(spec.with_updates(procs_per_node=2), port=29511), sock)
    assert two[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in two
    assert two[two.index(RUNNER) - 1:two.index("--") + 1] == ["-m", RUNNER, "run", "--socket", str(sock), "--"]
    assert WORKER not in two and two[two.index("--") + 1:] == spec.worker_args()
    other = [sys.executable, "-c", "pass"]
    assert warm_command(other, sock) == other


def test_a_runner_is_keyed_by_what_its_imports_read(tmp_path, monkeypatch):
    base = runner_key(CPU)
    # the job's own settings are applied after the fork: the same runner
    assert runner_key({**CPU, "OMP_NUM_THREADS": "1", "MOTUS_TRACKING_URI": "sqlite:///x.db",
                       "TORCH_EXTENSIONS_DIR": "/elsewhere", "PYTHONUNBUFFERED": "1"}) == base
    # what is read while importing is not: another runner
    for change in ({"DS_ACCELERATOR": "cuda"}, {"PYTHONPATH": "/src"}, {"HF_HUB_OFFLINE": "0"},
                   {"TORCHDYNAMO_DISABLE": "0"}):
        assert runner_key({**CPU, **change}) != base, change
    # forked jobs inherit the runner's priority: a `nice`d caller gets a runner of its own
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    monkeypatch.setattr(os, "getpriority", lambda which, who: niceness + 1)
    assert runner_key(CPU) != base
    monkeypatch.undo()
    # an edited motus source file is a new runner, never a stale one
    import motus

    src = Path(motus.__file__).parent / "launch" / "runner.py"
    st = src.stat()
    try:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert runner_key(CPU) != base
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert runner_key(CPU) == base


def test_jobs_that_cannot_go_warm_say_so_or_are_not_cpu_jobs(tmp_path):
    runners = Runners(tmp_path / "r")
    assert runners.ensure({**CPU, "DS_ACCELERATOR": "cuda"}) == (None, "")  # CUDA: cold, by design
    assert not (tmp_path / "r").exists()  # nothing was started
    deep = Runners(tmp_path / ("d" * 120))
    sock, why = deep.ensure(CPU)
    assert sock is None and "longer than a Unix socket allows" in why and "MOTUS_RUNNER_DIR" in why
    short = Path(tempfile.mkdtemp(prefix="mr"))  # tmp_path is too long for a socket
    try:
        blocked = short / "file"
        blocked.write_text("")
        sock, why = Runners(blocked / "sub").ensure(CPU)
        assert sock is None and "cannot start a runner in" in why and str(blocked / "sub") in why
    finally:
        shutil.rmtree(short)
    assert Runners(tmp_path / "none").running() == [] and Runners(tmp_path / "none").stop() == []
