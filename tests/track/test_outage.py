"""A tracking store that goes away mid-run (motus.track.outage): buffered, bounded, replayed exactly once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from motus.track import MlflowTracker  # noqa: E402
from motus.track.outage import (  # noqa: E402
    BUFFER_FILE,
    DROPPED_TAG,
    FILES_DIR,
    OFFSET_FILE,
    TrackingBuffer,
    apply_entry,
    drain,
    replay_buffer,
)

from ..support import servers  # noqa: E402
from ..support.proxy import CuttableProxy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, raised inside MLflow


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory) -> str:
    """One real MLflow server (SQLite backend) for the module: starting one costs 10-25 s on a loaded machine."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with servers.mlflow_server(f"sqlite:///{folder}/mlflow.db", folder / "artifacts") as url:
        yield url


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_an_outage_mid_run_loses_no_point_and_a_full_buffer_says_so(mlflow_url, tmp_path, monkeypatch, caplog):
    # MLflow retries a refused connection for about a minute; the tracker waits `send_timeout` for it and lets the
    # rest run in the background. No retries here, so the test does not wait for that background minute to end.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.INFO, logger="motus.track")
    quick = {"system_metrics": False, "send_timeout": 5.0, "retry_s": 0.2, "retry_max_s": 0.5, "finish_wait": 5.0}
    job_dir, small_dir = tmp_path / "job", tmp_path / "small"

    # the trackers talk to a real MLflow server through a forwarder that goes away and comes back on one address
    with CuttableProxy(mlflow_url) as store:
        url = store.url
        job = MlflowTracker(url, "outage", buffer_dir=job_dir, **quick)
        # a buffer of 700 bytes: its header and a few points, then the cap
        small = MlflowTracker(url, "outage", buffer_dir=small_dir, buffer_mb=700 / 2**20,
                              **{**quick, "finish_wait": 0.5})
        job.log_params({"lr": 0.1})
        for step in range(1, 4):
            job.log_metrics({"train/loss": 1.0 / step}, step)
        assert not (job_dir / BUFFER_FILE).exists()

        store.cut()  # the server is gone: training goes on without waiting for it
        t0 = time.monotonic()
        for step in range(4, 9):
            job.log_metrics({"train/loss": 1.0 / step}, step)
        job.set_tags({"phase": "during the outage"})
        job.log_params({"late": {"param": 1}})  # a param and the config artifact, copied into the buffer's folder
        assert time.monotonic() - t0 < 5
        lines = (job_dir / BUFFER_FILE).read_text().splitlines()
        assert json.loads(lines[0])["run_id"] == job.run_id
        assert [json.loads(line)["kind"] for line in lines[1:]] == ["metrics"] * 5 + ["tags", "params", "artifact"]
        assert json.loads(lines[1])["metrics"][0][:3] == ["train/loss", 0.25, 4]
        assert "does not answer (" in caplog.text and "HTTPConnectionPool" not in caplog.text  # the reason, short
        assert str(job_dir / BUFFER_FILE) in caplog.text

        # (c) the cap: said once, naming the file and the count, then the total at the end
        for step in range(1, 31):
            small.log_metrics({"train/loss": float(step)}, step)
        full = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
        assert len(full) == 1 and str(small_dir / BUFFER_FILE) in full[0] and "dropped 1 point(s)" in full[0]
        dropped = small._buffer.dropped
        kept = sum(len(json.loads(line)["metrics"]) for line in (small_dir / BUFFER_FILE).read_text().splitlines()[1:])
        assert dropped > 0 and kept + dropped == 30
        # the run ends while the store is still down: it waits finish_wait, keeps the buffer, says how to replay it
        small.finish()
        assert f"motus track replay {small_dir}" in caplog.text
        assert json.loads((small_dir / BUFFER_FILE).read_text().splitlines()[-1]) == {
            "kind": "end", "status": "FINISHED", "dropped": dropped}

        store.restore()  # back, on the same address
        time.sleep(0.5)  # past the tracker's retry time (retry_max_s)
        for step in (9, 10):  # step 9 joins the buffer, which is replayed in order; step 10 goes live
            job.log_metrics({"train/loss": 1.0 / step}, step)
        assert not (job_dir / BUFFER_FILE).exists() and not (job_dir / OFFSET_FILE).exists()
        assert not (job_dir / FILES_DIR).exists()
        assert "the tracking store answers again: 9 buffered entries" in caplog.text
        job.finish()
        replayed = replay_buffer(small_dir, MlflowClient(url))  # what `motus track replay` does
        assert replayed is not None and replayed.run_id == small.run_id and replayed.points == kept
        assert not (small_dir / BUFFER_FILE).exists()

        client = MlflowClient(url)
        assert _steps(client, job.run_id, "train/loss") == list(range(1, 11))  # every step, exactly once
        run = client.get_run(job.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["phase"] == "during the outage"
        assert run.data.params["lr"] == "0.1" and run.data.params["late.param"] == "1"
        params_json = Path(client.download_artifacts(job.run_id, "config/params.json", str(tmp_path / "dl")))
        assert json.loads(params_json.read_text()) == {"lr": 0.1, "late": {"param": 1}}
        small_run = client.get_run(small.run_id)
        assert small_run.info.status == "FINISHED" and small_run.data.tags[DROPPED_TAG] == str(dropped)
        assert _steps(client, small.run_id, "train/loss") == list(range(1, kept + 1))


def test_a_replay_cut_short_goes_on_where_it_stopped_and_logs_each_point_once(mlflow_url, tmp_path):
    uri = mlflow_url
    with MlflowTracker(uri, "replay", system_metrics=False) as tracker:
        run_id = tracker.run_id
    client = MlflowClient(uri)
    buffer = TrackingBuffer(tmp_path / "run", run_id)
    # metrics and tags by turns: consecutive metric entries would go as one send
    entries = [{"kind": "metrics", "metrics": [["m", float(step), step, 1_000 + step]]} if step % 2 else
               {"kind": "tags", "tags": {"t": str(step)}} for step in range(1, 6)]
    for entry in entries:
        assert buffer.append(entry)

    sent: list[dict] = []

    def dies_after_two(run: str, entry: dict) -> None:
        if len(sent) == 2:
            raise RuntimeError("killed mid-replay")
        apply_entry(client, run, entry)
        sent.append(entry)

    with pytest.raises(RuntimeError, match="killed"):
        drain(buffer, dies_after_two)
    assert json.loads((tmp_path / "run" / OFFSET_FILE).read_text())["offset"] > 0
    # and a crash between a send and its offset: the third entry reached the store, its offset was not recorded
    apply_entry(client, run_id, entries[2])

    done = replay_buffer(tmp_path / "run", client)
    assert done is not None and done.entries == 3  # entries 3 to 5: the first two are not sent again
    assert _steps(client, run_id, "m") == [1, 3, 5]  # step 3, sent twice with its timestamp, is held once
    assert client.get_run(run_id).data.tags["t"] == "4"
    assert not (tmp_path / "run" / BUFFER_FILE).exists() and not (tmp_path / "run" / OFFSET_FILE).exists()
    assert replay_buffer(tmp_path / "run", client) is None


RESUME = r"""
import logging
from motus.track import MlflowTracker

logging.basicConfig(level=logging.INFO, stream=sys.stderr)

root, uri = Path(sys.argv[1]), sys.argv[2]
ctx = init_distributed()
run_id, attempts = None, []
# the first attempt stops after step 5, whose last checkpoint is step 3 (as a crash after step 5 would leave it);
# the second resumes the same MLflow run (as motus.launch.worker does, from run.json) at step 3
for max_steps in (5, None):
    tracker = MlflowTracker(uri, "toy-resume", run_id=run_id, system_metrics=False, buffer_dir=root)
    toy = Toy(root, ctx, max_steps)
    toy.tracker = tracker
    result = Trainer(toy).run()
    tracker.finish("KILLED" if max_steps else "FINISHED")
    run_id = tracker.run_id
    attempts.append({"resumed_from": str(result.resumed_from), "steps": [s for s, _ in result.losses]})
print(json.dumps({"run_id": run_id, "attempts": attempts}))
"""


def test_a_resumed_job_logs_no_step_twice(mlflow_url, tmp_path):
    """The generic trainer's toy job (tests/train/test_trainer.py) with a real tracker: killed after step 5,
    resumed from its checkpoint at step 3, it computes steps 4 and 5 again; the run holds each step once."""
    from ..train.test_trainer import REPO, TOY_JOB

    script = tmp_path / "resume.py"
    script.write_text(TOY_JOB + RESUME)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), mlflow_url], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = out["attempts"]
    assert first["steps"] == [1, 2, 3, 4, 5] and second["resumed_from"].endswith("step-000003")
    assert second["steps"] == [4, 5, 6]  # 4 and 5 trained twice ...
    client = MlflowClient(mlflow_url)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and {"train/loss", "train/fit"} <= set(run.data.metrics)
    for key in run.data.metrics:  # ... and logged once: no key holds a step twice
        steps = _steps(client, out["run_id"], key)
        assert len(steps) == len(set(steps)), (key, steps)
    assert _steps(client, out["run_id"], "train/loss") == [1, 2, 3, 4, 5, 6]
    assert "already holds train/loss up to step 5" in proc.stdout + proc.stderr
