"""`MlflowTracker`: the `motus.train.tracking.Tracker` protocol, recorded as one MLflow run.

One tracker is one run, created or (given `run_id`) resumed: a training job that was killed and restarted
keeps reporting into the run it started. Everything goes through an explicit `mlflow.MlflowClient` bound to
this tracker's tracking URI, so two trackers in one process (two stores, two runs) never share MLflow's
process-global "active run" or tracking URI.

Where things land for a SQLite store (`sqlite:///path/mlflow.db`; a relative path is taken from the
current directory and made absolute, its folder is created): a new experiment gets the artifact location
`<db folder>/mlartifacts`, so a run's artifacts are in `<db folder>/mlartifacts/<run_id>/artifacts/`.
An experiment that already exists keeps its own artifact location; other stores (a tracking server) use
the server's default unless `artifact_location` is given.

Choices worth knowing:
- Params are flattened to dotted keys (`stages.stage1.lr`, list items as `layers.0`), stringified with
  `str()`, and values longer than MLflow's limit are cut with `PARAM_TRUNCATION_MARKER`; the full nested
  config (every `log_params` call of the run, merged) is always also the JSON artifact `config/params.json`.
- A param that is logged again with the same value is fine (a resumed job logs its config again); a
  different value raises `ParamConflictError` naming the keys: a resumed job must run the same config.
- Metrics: None values are skipped; NaN and +-inf are logged as they are (a diverged loss is a fact the run
  record must show, not hide; SQL stores keep NaN and record +-inf as +-1.797e308, the largest float).
  Anything `float()` cannot convert raises `TypeError` naming the key.
- A dataset digest longer than MLflow's 36-character limit (a sha256 tier hash is 64) is stored as its
  first 36 characters in the dataset input; the full digest is the run tag `tier.<name>.digest` and
  `digest` in the dataset's profile. MLflow records a dataset once per run: logging it again (a resumed
  job) is harmless, and the context of the first logging stays.
- System metrics (`system/...`, CPU, memory, disk, network, GPU when there is one) are sampled by MLflow's
  `SystemMetricsMonitor` bound to this run and URI (no fluent run), every `system_metrics_interval`
  seconds (MLflow's `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` overrides it), and stopped by `finish`.
- A tracker never finished by its process ends its run as KILLED at interpreter exit.
- A resumed run does not log a metric step it already holds: at resume, one history query per key gives its
  highest step, and `log_metrics` passes over steps at or below it (see `_steps_held` for why).
- Given `buffer_dir` (a job's run folder), a store that stops answering mid-run does not stall the job: each
  send waits at most `send_timeout` seconds, then what could not be sent is buffered in the run folder and
  replayed when the store answers again (`motus.track.outage`). Without it, a send fails as MLflow's does.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException

from ..contracts import ServiceUnreachable
from .outage import DEFAULT_BUFFER_MB, DROPPED_TAG, REPLAY_HINT, TrackingBuffer, apply_entry, drain

logger = logging.getLogger(__name__)

Status = Literal["FINISHED", "FAILED", "KILLED"]
STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")

PARAMS_ARTIFACT = "config/params.json"
PARAM_TRUNCATION_MARKER = "...[truncated; full value in config/params.json]"
# MLflow's limits (mlflow.utils.validation), fixed here so they do not depend on a private module.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_DATASET_DIGEST_LENGTH = 36
ARTIFACTS_FOLDER = "mlartifacts"

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


class ParamConflictError(ValueError):
    """A param logged again with a different value (MLflow params are write-once)."""


class _Outage(Exception):
    """A send that the store did not answer (in time): the entry goes to the buffer."""


def _reason(error: BaseException) -> str:
    """An outage in a few words: the OS error inside MLflow's "API request to ... failed with exception ...
    HTTPConnectionPool(...): Max retries exceeded ... NewConnectionError(...)" when there is one."""
    text = str(error)
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno:
        return errno.group(0)
    if "Caused by " in text:  # e.g. ProtocolError('Connection aborted.', RemoteDisconnected(...))
        return text.split("Caused by ", 1)[1].splitlines()[0][:200].rstrip(")")
    return text.splitlines()[0][:200] if text else type(error).__name__


def is_outage(error: BaseException) -> bool:
    """Whether a failed MLflow call means the store is away (a refused or dropped connection, a timeout, a 5xx, a
    database that does not answer) rather than that it refused the request (a 4xx: a bug to raise, not buffer)."""
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status in (408, 429)
    return isinstance(error, (OSError, ConnectionError, TimeoutError)) or type(error).__module__.startswith(
        ("requests", "urllib3", "sqlalchemy", "psycopg2"))


# ---------------------------------------------------------------------------------------------- URIs


def sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (absolute when the URI is), or None for other stores."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = tracking_uri[len(prefix):].partition("?")[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


class TrackingUnreachable(ServiceUnreachable):
    """The tracking store does not answer: said at once, naming the (masked) URI, instead of minutes of retries."""


REACH_TIMEOUT_S = 5.0
_REACHED: set[str] = set()
_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def _probe(tracking_uri: str, timeout: float) -> None:
    """One request to a tracking server (any HTTP answer counts) or a TCP connect to a database; OSError or
    URLError when it does not answer. Files (SQLite) and unknown schemes: nothing to probe."""
    import socket
    import urllib.error
    import urllib.request

    u = urlparse(tracking_uri)
    scheme = u.scheme.split("+")[0]
    if scheme not in ("http", "https", *_DB_PORTS) or not u.hostname:
        return
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    if scheme in ("http", "https"):
        base = f"{scheme}://{host}{f':{u.port}' if u.port else ''}{u.path.rstrip('/')}"
        try:
            urllib.request.urlopen(f"{base}/health", timeout=timeout).close()  # noqa: S310 - http(s) only
        except urllib.error.HTTPError:
            pass  # it answered (a 401 of an authenticating server, a 404 behind a proxy): reachable
    else:
        socket.create_connection((u.hostname, u.port or _DB_PORTS[scheme]), timeout=timeout).close()


def answers(tracking_uri: str, timeout: float = 2.0) -> bool:
    """Whether the tracking store answers one quick probe now (never cached: the outage buffer asks again)."""
    try:
        _probe(tracking_uri, timeout)
    except OSError:  # URLError is an OSError
        return False
    return True


def check_reachable(tracking_uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """One quick probe of a tracking server (any HTTP answer counts) or database (a TCP connect), once per URI and
    process; TrackingUnreachable naming the masked URI and the reason otherwise. Files (SQLite) need no probe."""
    import urllib.error

    from ..contracts import mask_secrets

    if tracking_uri in _REACHED:
        return
    try:
        _probe(tracking_uri, timeout)
    except (OSError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", None) or e
        raise TrackingUnreachable(f"the tracking store {mask_secrets(tracking_uri)} does not answer ({reason}); "
                                  f"start it or point MOTUS_TRACKING_URI at one that runs") from None
    _REACHED.add(tracking_uri)


def resolve_tracking_uri(tracking_uri: str) -> str:
    """A SQLite URI with an absolute path (a relative one is taken from the cwd) whose folder exists.

    `sqlite:///mlflow.db` -> `sqlite:////<cwd>/mlflow.db`. Other URIs are returned unchanged.
    """
    db = sqlite_db_path(tracking_uri)
    if db is None:
        return tracking_uri
    _, sep, query = tracking_uri.partition("?")
    db = db if db.is_absolute() else Path.cwd() / db
    db = db.resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db.as_posix()}{sep}{query}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """`file://<db folder>/mlartifacts` for a SQLite store; None (the store's default) otherwise."""
    db = sqlite_db_path(resolve_tracking_uri(tracking_uri))
    return None if db is None else (db.parent / ARTIFACTS_FOLDER).as_uri()


# ---------------------------------------------------------------------------------------------- params


def _key(key: Any) -> str:
    """A param/tag key MLflow accepts: characters outside [/\\w.- :] become `_`."""
    return _BAD_KEY_CHARS.sub("_", str(key))


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> {dotted key: str(value)}; an empty dict/list keeps its key as `{}`/`[]`."""
    flat: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            items: Iterator[tuple[Any, Any]] = iter(value.items())
        elif isinstance(value, (list, tuple)):
            items = iter(enumerate(value))
        else:
            flat[key] = str(value)
            return
        empty = True
        for k, v in items:
            empty = False
            walk(v, f"{key}.{_key(k)}" if key else _key(k))
        if empty and key:
            flat[key] = "{}" if isinstance(value, Mapping) else "[]"

    walk(nested, prefix)
    return flat


def truncate_value(value: str, limit: int = MAX_PARAM_VALUE_LENGTH, marker: str = PARAM_TRUNCATION_MARKER) -> str:
    """`value`, or its head + `marker` when it is longer than `limit` (the result is exactly `limit` long)."""
    if len(value) <= limit:
        return value
    return value[: limit - len(marker)] + marker


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _deep_merge(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


# ---------------------------------------------------------------------------------------------- datasets


class ExternalDatasetSource(DatasetSource):
    """A source MLflow has no resolver for (e.g. `sim:metaworld`): recorded as its URI string."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "external"

    def load(self) -> str:
        return self.uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> ExternalDatasetSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> ExternalDatasetSource:
        return cls(source_dict["uri"])


def dataset_source(source: str | Path) -> DatasetSource:
    """A dataset source for a local path (made absolute), a URI (s3://, https://, ...) or anything else."""
    text = str(source)
    scheme = urlparse(text).scheme
    if isinstance(source, Path) or scheme == "" or (len(scheme) == 1 and text[1:3] in (":\\", ":/")):
        text = str(Path(text).absolute())
    with warnings.catch_warnings():  # "can be interpreted in multiple ways" (file and "" share a class)
        warnings.simplefilter("ignore")
        try:
            return resolve_dataset_source(text)
        except MlflowException:
            return ExternalDatasetSource(text)


def _context_tags(tags: dict[str, str] | None) -> dict[str, str]:
    """User, source and git tags as `mlflow.start_run` would add them, then `tags` over them."""
    user = {k: str(v) for k, v in (tags or {}).items()}
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: str(v) for k, v in resolve_tags(user).items()}
    except Exception:  # context tags are a courtesy; a run without them is still a run
        logger.debug("could not resolve MLflow context tags", exc_info=True)
        return user


# ---------------------------------------------------------------------------------------------- tracker


class MlflowTracker:
    """One MLflow run: created in `experiment`, or resumed with `run_id`. Use on rank 0 only.

    Implements `motus.train.tracking.Tracker`; also a context manager (FINISHED on a clean exit, KILLED
    on KeyboardInterrupt, FAILED on any other exception).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        system_metrics: bool = True,
        *,
        system_metrics_interval: float = 2.0,
        artifact_location: str | None = None,
        buffer_dir: Path | None = None,
        buffer_mb: float = DEFAULT_BUFFER_MB,
        send_timeout: float = 10.0,
        retry_s: float = 5.0,
        retry_max_s: float = 60.0,
        finish_wait: float = 60.0,
    ):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        check_reachable(self.tracking_uri)  # a job against a store that does not answer stops now, naming it
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._finished = False
        self._monitor: Any = None
        self._params: dict[str, str] = {}
        self._config: dict[str, Any] = {}
        # outages (see motus.track.outage): a bounded wait per send, then the buffer and a backoff between retries
        self.send_timeout, self.finish_wait = send_timeout, finish_wait
        self._retry_first, self._retry_max = retry_s, retry_max_s
        self._backoff = retry_s
        self._retry_at = 0.0  # time.monotonic() before which no send is tried (the store was found down)
        self._down_since: float | None = None
        self._stuck: threading.Thread | None = None  # a send that outlived send_timeout, still inside MLflow
        self._buffer: TrackingBuffer | None = None
        self._dropped_reported = 0
        self._replayed_entries = self._replayed_points = 0  # of a replay done in slices, for its one log line
        self._held_upto: dict[str, int] = {}  # metric key -> highest step the run held before this attempt
        self._skipped_held = 0

        if run_id is None:
            self.experiment_id = self._ensure_experiment(experiment, artifact_location)
            run = self.client.create_run(self.experiment_id, tags=_context_tags(tags), run_name=run_name)
            self.resumed = False
        else:
            run = self._resume(run_id, experiment)
            self.experiment_id = run.info.experiment_id
            self.resumed = True
        self.run_id: str | None = run.info.run_id
        self.run_name: str = run.info.run_name
        self.artifact_uri: str = run.info.artifact_uri
        if buffer_dir is not None:
            self._buffer = TrackingBuffer(Path(buffer_dir), self.run_id, buffer_mb)
            self._adopt_leftover_buffer()
        if self.resumed:
            self._params = dict(run.data.params)
            self._config = self._load_logged_config()
            self._held_upto = self._steps_held()
            if tags:
                self.set_tags(tags)
        atexit.register(self._finish_at_exit)
        if system_metrics:
            self._start_system_metrics(system_metrics_interval)

    # ------------------------------------------------------------------------------------ lifecycle

    def _ensure_experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = artifact_location or default_artifact_location(self.tracking_uri)
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException as e:  # created by someone else in between
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
                assert exp is not None
        if exp.lifecycle_stage == LifecycleStage.DELETED:
            raise ValueError(
                f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted in {self.tracking_uri}; "
                f"restore it (`mlflow experiments restore --experiment-id {exp.experiment_id}`) "
                "or use another experiment name")
        return exp.experiment_id

    def _resume(self, run_id: str, experiment: str) -> Any:
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            raise ValueError(f"cannot resume MLflow run {run_id!r}: not found in {self.tracking_uri}") from e
        if run.info.lifecycle_stage == LifecycleStage.DELETED:
            raise ValueError(f"cannot resume MLflow run {run_id!r}: it is deleted")
        exp = self.client.get_experiment(run.info.experiment_id)
        if exp.name != experiment:
            raise ValueError(
                f"cannot resume MLflow run {run_id!r} in experiment {experiment!r}: "
                f"it belongs to experiment {exp.name!r}")
        self.client.update_run(run_id, status="RUNNING")
        return run

    def _start_system_metrics(self, interval: float) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=interval, resume_logging=self.resumed,
                tracking_uri=self.tracking_uri)
            monitor.start()
        except Exception as e:  # e.g. psutil missing: the run goes on without system metrics
            logger.warning("system metrics are off for run %s: %s", self.run_id, e)
            return
        self._monitor = monitor

    def finish(self, status: Status = "FINISHED") -> None:
        """End the run with `status` and stop system metrics. Later calls do nothing.

        With a buffer: what is buffered is replayed first, waiting up to `finish_wait` seconds for a store that is
        down; if it is still down, the run's end joins the buffer and the log says how to replay it.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self._finished:
            return
        self._finished = True
        atexit.unregister(self._finish_at_exit)
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            if self._buffer is None:
                monitor.finish()  # flushes its last samples while the run is still RUNNING
            else:  # its thread may sit in MLflow's retries of a store that is down: a bounded wait, not theirs
                stopper = threading.Thread(target=monitor.finish, daemon=True, name="motus-system-metrics-stop")
                stopper.start()
                stopper.join(self.send_timeout)
        end = {"kind": "end", "status": status, "dropped": self._buffer.dropped if self._buffer else 0}
        self._deliver(end)
        if self._buffer is None:
            return
        deadline = time.monotonic() + self.finish_wait
        while self._buffer.pending():
            self._retry_at = 0.0  # waiting anyway: one cheap probe a second rather than the backoff
            if self._try_drain() or time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if self._buffer.pending():
            from ..contracts import mask_secrets

            logger.warning(
                "the tracking store %s still does not answer after %g s: run %s ends %s, but its last metrics, "
                "params and tags and its end are kept in %s; once the store answers, replay them with `%s` "
                "(or rerun the job, which replays them before it resumes)", mask_secrets(self.tracking_uri),
                self.finish_wait, self.run_id, status, self._buffer.path,
                REPLAY_HINT.format(folder=self._buffer.folder))

    # ------------------------------------------------------------------------------------ outages

    def _deliver(self, entry: dict[str, Any], stash: Path | None = None) -> None:
        """Send one entry (see motus.track.outage) now, or buffer it when the store is down or a buffer waits
        (entries reach the store in the order they were made). Without a buffer folder: MLflow's call as is.

        `stash`: for an artifact, the file or folder a buffered entry keeps a copy of."""
        if self._buffer is None:
            apply_entry(self.client, self.run_id, entry)
            return
        if not self._buffer.pending() and not self._sending() and time.monotonic() >= self._retry_at:
            try:
                self._send(entry)
                return
            except _Outage as e:
                self._went_down(str(e))
        if self._buffer.append(entry, stash, force=entry["kind"] == "end"):
            self._try_drain()

    def _sending(self) -> bool:
        """Whether a send that outlived its wait is still inside MLflow (no other send starts before it ends: two
        writes of one tag must not land out of order)."""
        if self._stuck is not None and not self._stuck.is_alive():
            self._stuck = None
        return self._stuck is not None

    def _send(self, entry: dict[str, Any], run_id: str | None = None) -> None:
        """`apply_entry` in a thread this call waits `send_timeout` seconds for: a store that hangs (or MLflow's
        minute of retries against a refused connection) costs a step that long at most, once, and the send goes
        on in the background (if it lands, its replay later is a no-op: a point keeps its timestamp).
        _Outage when it does not answer in time or fails as an outage does; any other error is the caller's."""
        result: dict[str, BaseException] = {}

        def run() -> None:
            try:
                apply_entry(self.client, run_id or self.run_id, entry, self._buffer.files if run_id else None)
            except BaseException as e:  # handed to the waiting thread
                result["error"] = e

        thread = threading.Thread(target=run, daemon=True, name="motus-tracking-send")
        thread.start()
        thread.join(self.send_timeout)
        if thread.is_alive():
            self._stuck = thread
            raise _Outage(f"no answer within {self.send_timeout:g} s")
        error = result.get("error")
        if error is None:
            return
        if is_outage(error):
            raise _Outage(_reason(error)) from error
        raise error

    def _went_down(self, reason: str) -> None:
        now = time.monotonic()
        if self._down_since is None:
            from ..contracts import mask_secrets

            self._down_since = now
            logger.warning("the tracking store %s does not answer (%s): training goes on; metrics, params, tags and "
                           "artifacts are kept in %s and sent when it answers again (first retry in %g s)",
                           mask_secrets(self.tracking_uri), mask_secrets(reason), self._buffer.path if self._buffer
                           else "(no buffer)", self._backoff)
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self._retry_max)

    def _try_drain(self) -> bool:
        """Replay the buffer if it is time to retry and the store answers a probe; True when nothing is left."""
        buffer = self._buffer
        if buffer is None or not buffer.pending():
            return True
        if self._sending() or time.monotonic() < self._retry_at:
            return False
        if not answers(self.tracking_uri, min(2.0, self.send_timeout)):
            self._went_down("no answer to a probe")
            return False

        def send(run_id: str, entry: dict[str, Any]) -> None:
            try:
                self._send(entry, run_id)
            except _Outage:
                raise
            except Exception as e:  # the store answers but refuses this entry: it must not hold up the others
                logger.error("the tracking store refused a buffered %s entry of run %s (%s); passing over it",
                             entry.get("kind"), run_id, e)

        down_for = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        try:  # a slice of send_timeout per call: the step that finds the store back is not held up by all of it
            replayed = drain(buffer, send, deadline=None if self._finished else time.monotonic() + self.send_timeout)
        except _Outage as e:
            self._went_down(str(e))
            return False
        self._replayed_entries += replayed.entries
        self._replayed_points += replayed.points
        if not replayed.done:
            return False
        replayed.entries, replayed.points = self._replayed_entries, self._replayed_points
        self._replayed_entries = self._replayed_points = 0
        self._down_since, self._backoff, self._retry_at = None, self._retry_first, 0.0
        logger.warning("the tracking store answers again: %d buffered entries (%d metric, param and tag points) "
                       "replayed into run %s from %s%s", replayed.entries, replayed.points, replayed.run_id,
                       buffer.path, f" after {down_for:.0f} s" if down_for else "")
        if buffer.dropped > self._dropped_reported:
            logger.warning("tracking buffer %s was full for a while: %d point(s) were dropped in all (the run's "
                           "tag %s records the count)", buffer.path, buffer.dropped, DROPPED_TAG)
            self._dropped_reported = buffer.dropped
        return True

    def _adopt_leftover_buffer(self) -> None:
        """A buffer an earlier process of this run folder left (it crashed, or ended while the store was down):
        replayed now, before anything new is logged, so its points come first and count as held on resume."""
        buffer = self._buffer
        assert buffer is not None
        if not buffer.pending():
            return
        leftover_run = buffer.header_run_id
        logger.warning("%s holds what an earlier attempt could not send to run %s: replaying it", buffer.path,
                       leftover_run)
        if not self._try_drain() and leftover_run not in (None, self.run_id):
            raise RuntimeError(
                f"{buffer.path} holds unsent entries of another MLflow run ({leftover_run}) and the store stopped "
                f"answering while they were replayed; run `{REPLAY_HINT.format(folder=buffer.folder)}` once it "
                "answers, then start the job again")

    def _steps_held(self) -> dict[str, int]:
        """Per metric key, the highest step this run already holds (or has buffered) before this attempt logs.

        Why a resumed job must not log those steps again: it resumes from its latest checkpoint at step S, but the
        attempt that crashed may have logged steps up to k > S; the resumed job computes S+1..k again (the same
        values: a step is a pure function of seed, step and rank) and MLflow would hold each of them twice, since
        a metric point is (key, step, timestamp, value) and the timestamps differ. Checkpoints do not know what
        reached the store, so the store says it: one metric history query per key at resume (system metrics,
        which MLflow's monitor numbers itself, left out), and `log_metrics` passes over a point whose step is at
        or below its key's highest held step. One number per key, not a set of steps: a long run's history
        stays in MLflow, not in the job's memory; a resumed job only ever logs forward of its checkpoint.
        """
        held: dict[str, int] = {}
        keys = [k for k in self.client.get_run(self.run_id).data.metrics if not k.startswith("system/")]
        for key in keys:
            steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
            if steps:
                held[key] = max(steps)
        if self._buffer is not None and self._buffer.header_run_id == self.run_id:
            for key, step in self._buffer.pending_metric_steps().items():
                held[key] = max(held.get(key, step), step)
        return held

    @property
    def finished(self) -> bool:
        return self._finished

    def _finish_at_exit(self) -> None:
        try:
            self.finish("KILLED")
        except Exception:  # the store may be gone at interpreter exit
            logger.debug("could not end run %s at exit", self.run_id, exc_info=True)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    def __repr__(self) -> str:
        return f"MlflowTracker(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"MLflow run {self.run_id} is already finished")

    # ------------------------------------------------------------------------------------ params/tags

    def log_params(self, params: dict[str, Any]) -> None:
        """Flatten `params` to dotted keys, log them (truncated to MLflow's limit) and `config/params.json`.

        Raises `ParamConflictError` (before logging anything) if a key was already logged to this run with
        a different value.
        """
        self._check_open()
        flat = {k: truncate_value(v) for k, v in flatten_params(params).items()}
        conflicts = [(k, self._params[k], v) for k, v in flat.items() if k in self._params and self._params[k] != v]
        if conflicts:
            shown = "; ".join(f"{k!r}: logged {old!r}, now {new!r}" for k, old, new in conflicts[:10])
            more = f" (and {len(conflicts) - 10} more)" if len(conflicts) > 10 else ""
            raise ParamConflictError(
                f"MLflow run {self.run_id} already has different values for {len(conflicts)} param(s): "
                f"{shown}{more}. A resumed run must use the configuration it started with; "
                "start a new run for a new configuration.")
        new = {k: v for k, v in flat.items() if k not in self._params}
        if new:
            self._deliver({"kind": "params", "params": new})
        self._params.update(flat)
        _deep_merge(self._config, _jsonable(params))
        self._write_artifact(PARAMS_ARTIFACT, lambda p: p.write_text(
            json.dumps(self._config, indent=2, default=str) + "\n", encoding="utf-8"))

    def _load_logged_config(self) -> dict[str, Any]:
        """The `config/params.json` a resumed run already has (merged into, never overwritten), or {}."""
        try:
            parsed = urlparse(self.artifact_uri)
            if parsed.scheme in ("", "file"):  # local artifacts: read in place (no copy, no progress bar)
                local = Path(url2pathname(parsed.path)) / PARAMS_ARTIFACT
                loaded = json.loads(local.read_text(encoding="utf-8")) if local.is_file() else {}
            else:
                listed = {a.path for a in self.client.list_artifacts(self.run_id, PurePosixPath(PARAMS_ARTIFACT).parent.as_posix())}
                if PARAMS_ARTIFACT not in listed:
                    return {}
                with tempfile.TemporaryDirectory() as tmp:
                    local = Path(self.client.download_artifacts(self.run_id, PARAMS_ARTIFACT, tmp))
                    loaded = json.loads(local.read_text(encoding="utf-8"))
        except Exception:  # unreadable: start from what this attempt logs
            logger.warning("could not read %s of run %s; it will hold this attempt's params only",
                           PARAMS_ARTIFACT, self.run_id, exc_info=True)
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def set_tags(self, tags: dict[str, str]) -> None:
        self._check_open()
        run_tags = {_key(k): truncate_value(str(v), MAX_TAG_VALUE_LENGTH, "...[truncated]") for k, v in tags.items()}
        if run_tags:
            self._deliver({"kind": "tags", "tags": run_tags})

    # ------------------------------------------------------------------------------------ metrics

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One batch at `step`; None is skipped, NaN/inf are logged as they are. A resumed run passes over the
        steps it already holds (see `_steps_held`)."""
        self._check_open()
        timestamp = int(time.time() * 1000)
        step = int(step)
        batch = []
        for key, value in metrics.items():
            if value is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"metric {key!r}: {value!r} is not a number") from e
            if step <= self._held_upto.get(str(key), -(2**63)):
                if not self._skipped_held:
                    logger.info("run %s already holds %s up to step %d (an earlier attempt logged it): the resumed "
                                "job does not log those steps again", self.run_id, key, self._held_upto[str(key)])
                self._skipped_held += 1
                continue
            batch.append([str(key), number, step, timestamp])
        if batch:
            self._deliver({"kind": "metrics", "metrics": batch})

    # ------------------------------------------------------------------------------------ datasets

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training",
                    extra: dict[str, Any] | None = None) -> None:
        """A tier as a dataset input (tagged `mlflow.data.context=<context>`) + run tag `tier.<name>.digest`.

        `extra` (e.g. episode and frame counts) and the full digest are the dataset's JSON profile.
        """
        self._check_open()
        if not digest:
            raise ValueError(f"dataset {name!r}: empty digest")
        meta = MetaDataset(source=dataset_source(source), name=name, digest=digest[:MAX_DATASET_DIGEST_LENGTH])
        d = meta.to_dict()
        profile = json.dumps(_jsonable({**(extra or {}), "digest": digest}), default=str)
        entity = DatasetEntity(name=d["name"], digest=d["digest"], source_type=d["source_type"],
                               source=d["source"], schema=d.get("schema"), profile=profile)
        self._deliver({"kind": "dataset", "context": context, "dataset": {
            "name": entity.name, "digest": entity.digest, "source_type": entity.source_type, "source": entity.source,
            "schema": entity.schema, "profile": entity.profile}})
        self.set_tags({f"tier.{name}.digest": digest})

    # ------------------------------------------------------------------------------------ artifacts

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file -> `<artifact_path>/<name>`; a directory -> `<artifact_path>/<dir name>/...` (recursive)."""
        self._check_open()
        path = Path(path)
        if path.is_dir():
            dest = path.resolve().name if artifact_path is None else f"{artifact_path}/{path.resolve().name}"
            self._deliver({"kind": "artifact", "path": str(path), "artifact_path": dest}, stash=path)
        elif path.is_file():
            self._deliver({"kind": "artifact", "path": str(path), "artifact_path": artifact_path}, stash=path)
        else:
            raise FileNotFoundError(f"no file or directory to log as an artifact: {path}")

    def _write_artifact(self, name: str, write: Callable[[Path], Any]) -> None:
        """Write one artifact file named `name` (a relative artifact path) with `write(local_path)`."""
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.name:
            raise ValueError(f"artifact name must be a relative file path without '..', got {name!r}")
        with tempfile.TemporaryDirectory(prefix="motus-artifact-") as tmp:
            local = Path(tmp) / rel.name
            write(local)
            folder = str(rel.parent)
            self._deliver({"kind": "artifact", "path": str(local), "artifact_path": None if folder == "." else folder},
                          stash=local)

    def log_image(self, image: np.ndarray, name: str) -> None:
        """uint8 [H, W, 3] -> PNG artifact at `name` (`.png` appended when missing)."""
        self._check_open()
        from PIL import Image

        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"log_image needs a uint8 [H, W, 3] array, got {array.dtype} {list(array.shape)}")
        name = name if name.lower().endswith(".png") else f"{name}.png"
        picture = Image.fromarray(np.ascontiguousarray(array))
        self._write_artifact(name, lambda p: picture.save(p, format="PNG"))

    def log_loss_curve(self, history: dict[str, list[tuple[int, float]]], name: str = "loss_curve.png") -> None:
        """Series -> [(step, value)] as one PNG: one axes, log y when every plotted value is > 0."""
        self._check_open()
        name = name if name.lower().endswith(".png") else f"{name}.png"
        self._write_artifact(name, lambda p: plot_loss_curve(history, p, title=PurePosixPath(name).stem))


def plot_loss_curve(history: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """Render `history` to a PNG at `path` with matplotlib's Agg canvas (pyplot and its globals untouched).

    Non-finite and None values are left out of the plot (they are in the metric history).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted: list[float] = []
    for series, points in history.items():
        finite = sorted((int(s), float(v)) for s, v in points if v is not None and math.isfinite(float(v)))
        if not finite:
            continue
        steps, values = zip(*finite, strict=True)
        ax.plot(steps, values, label=str(series), linewidth=1.2)
        plotted.extend(values)
    if plotted and min(plotted) > 0:
        ax.set_yscale("log")
    if plotted:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)
