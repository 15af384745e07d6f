"""Jobs forked from a warm runner (motus.launch.runner) are the jobs a cold process runs: the same losses and
weights bit for bit, the same exit status, and one process tree to whoever kills it."""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from motus.launch.runner import Runners, alive

from ..support.project import MOTUS, project_env

pytestmark = pytest.mark.slow


@pytest.fixture
def runner_dir():
    folder = Path(tempfile.mkdtemp(prefix="mr"))  # short: a socket path has 107 bytes
    yield folder
    Runners(folder).stop()
    shutil.rmtree(folder, ignore_errors=True)


def train(proj: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MOTUS), "train", *args], cwd=proj, env=env, capture_output=True, text=True,
                          timeout=600)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def gone(pid: int, within_s: float = 15.0) -> bool:
    deadline = time.time() + within_s
    while alive(pid):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def started_job(proc: subprocess.Popen) -> tuple[int, int]:
    """(job pid, runner pid) from the job process's first line, read as the job starts."""
    for line in proc.stderr:
        m = re.search(r"job process (\d+) forked from runner (\d+)", line)
        if m:
            return int(m[1]), int(m[2])
    raise AssertionError(f"the job never said it was forked (exit {proc.wait()})")


def test_a_warm_job_is_the_cold_job(project, runner_dir):
    cold_env = project_env(project, MOTUS_WARM_JOBS="false")
    warm_env = project_env(project, MOTUS_WARM_JOBS="true", MOTUS_RUNNER_DIR=str(runner_dir))
    runs = project / "runs"
    cold = train(project, cold_env, "--stage", "1", "--run-dir", str(runs / "cold"), "--no-track")
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert "forked from runner" not in cold.stderr
    warm = train(project, warm_env, "--stage", "1", "--run-dir", str(runs / "warm"), "--no-track")
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "forked from runner" in warm.stderr and "starting the job cold" not in warm.stderr
    # every logged number that does not measure time, and the exported weights, bit for bit
    timed = ("perf/", "cost/", "system/")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(timed)} for r in rows]  # noqa: E731
    assert strip(metrics(runs / "warm")) == strip(metrics(runs / "cold"))
    # (tensor by tensor: the file's JSON header lists them in an order that varies between any two processes)
    warm_w, cold_w = (load_file(runs / r / "export" / "model.safetensors") for r in ("warm", "cold"))
    assert warm_w.keys() == cold_w.keys() and all(torch.equal(warm_w[k], cold_w[k]) for k in cold_w)
    (runner_pid, _), = Runners(runner_dir).running()

    # a job that fails says so as a cold one would: exit status and message
    bad = ["--stage", "3", "--run-dir", str(runs / "bad"), "--no-track", "--init-from", str(project / "nope")]
    c, w = train(project, cold_env, *bad), train(project, warm_env, *bad)
    assert w.returncode == c.returncode != 0
    err = lambda r: [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]  # noqa: E731
    assert err(w) == err(c) and err(w), w.stderr[-2000:]

    # kill -9 of the job process (a cancelled pipeline, `kill` on the run folder): the forked job ends too. The
    # job is long (400 steps), so it is still training when the signals land, however busy the machine.
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["stages"]["stage1"].update(steps=400, checkpoint_every=400, validate_every=400)
    (project / "params-long.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    long = ("--stage", "1", "--params", "params-long.yaml", "--no-track")
    job = subprocess.Popen([str(MOTUS), "train", *long, "--run-dir", str(runs / "killed")],
                           cwd=project, env=warm_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    pid, runner = started_job(job)
    assert runner == runner_pid  # the same runner served every job
    client = _children(job.pid)
    assert client, "no job process under `motus train`"
    for p in client:
        os.kill(p, signal.SIGKILL)
    assert gone(pid), f"job {pid} outlived its killed job process"
    assert job.wait(60) != 0 and not (runs / "killed" / "export").exists()

    # SIGTERM to `motus train` reaches the forked job, which ends by it; the launcher reports a kill
    job = subprocess.Popen([str(MOTUS), "train", *long, "--run-dir", str(runs / "term")],
                           cwd=project, env=warm_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    pid, _ = started_job(job)
    job.send_signal(signal.SIGTERM)
    assert gone(pid), f"job {pid} ignored the forwarded SIGTERM"
    assert job.wait(60) != 0
    assert "killed (exit -15)" in job.stderr.read()

    # stopped: the runner is gone with its socket and pid file
    assert Runners(runner_dir).stop() == [runner_pid] and gone(runner_pid)
    assert not list(runner_dir.glob("*.sock")) and Runners(runner_dir).running() == []


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children()]
