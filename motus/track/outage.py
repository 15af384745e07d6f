"""A tracking store that stops answering mid-run: the buffer a tracker keeps in its run folder, and its replay.

A training job must neither stall on a tracking server that went away nor lose what it would have logged. So
`MlflowTracker` (given a run folder) turns every metric batch, param and tag batch, dataset input, artifact and
the run's end into an *entry*, sends it within a bounded time, and on an outage appends it to
`<run folder>/tracking-buffer.jsonl` instead; the buffer is replayed, in order, when the store answers again,
at the run's end, when the job resumes, or by `motus track replay RUN_DIR`.

The file, append-only, one JSON object a line:
- line 1, the header: `{"motus_tracking_buffer": 1, "id": <random>, "run_id": <MLflow run>}`;
- then entries: `{"kind": "metrics", "metrics": [[key, value, step, timestamp_ms], ...]}`, `"params"` /
  `"tags"` (`{key: value}`), `"dataset"` (the input's fields), `"artifact"` (`path` relative to
  `tracking-buffer-files/`, where a copy of the file waits, and `artifact_path`), `"end"` (`status`, `dropped`).

Replay records how far it got in `tracking-buffer.offset` (`{"id", "offset"}`, replaced atomically after each
entry), so a replay that crashes resumes after the last entry it sent instead of logging everything again; the
id ties the offset to one buffer file, so an offset left by a crash between removing a drained buffer and its
offset never applies to the next buffer. An entry sent twice anyway (a crash between its send and its offset)
is still logged once: a metric point keeps its original timestamp, and MLflow's SQL stores hold a point
(key, step, timestamp, value) once however often it is sent; params and tags of the same value are idempotent.

The buffer is bounded (`MOTUS_TRACKING_BUFFER_MB`, the file plus the artifact copies): what does not fit is
dropped, said once when it starts (naming the file and the count) and counted; the total is logged when the
buffer drains and recorded on the run as the tag `motus.tracking.dropped_points`. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

BUFFER_FILE = "tracking-buffer.jsonl"
OFFSET_FILE = "tracking-buffer.offset"
FILES_DIR = "tracking-buffer-files"
FORMAT = 1
DEFAULT_BUFFER_MB = 64.0
DROPPED_TAG = "motus.tracking.dropped_points"
REPLAY_HINT = "motus track replay {folder}"
# MLflow's limits (mlflow.utils.validation), fixed here so they do not depend on a private module.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
DATASET_CONTEXT_TAG = "mlflow.data.context"

_T = TypeVar("_T")


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def entry_points(entry: dict[str, Any]) -> int:
    """How many points an entry carries (what a dropped entry costs, in the count the log reports)."""
    kind = entry.get("kind")
    if kind == "metrics":
        return len(entry.get("metrics", ()))
    if kind in ("params", "tags"):
        return len(entry.get(kind, {}))
    return 1


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class TrackingBuffer:
    """The buffer file of one run folder. `run_id` is the run new entries belong to; a buffer left by an earlier
    process names its own run in its header (`header_run_id`), and replaying sends there."""

    def __init__(self, folder: Path, run_id: str | None, cap_mb: float = DEFAULT_BUFFER_MB):
        self.folder = Path(folder)
        self.path = self.folder / BUFFER_FILE
        self.offset_path = self.folder / OFFSET_FILE
        self.files = self.folder / FILES_DIR
        self.run_id = run_id
        self.cap_bytes = cap_mb * 1024 * 1024  # a float: `inf` for a replay, which never drops
        self.dropped = 0  # points dropped at the cap since this object was made
        self._warned = False
        self._tail_checked = False
        self._size = _tree_bytes(self.path) + _tree_bytes(self.files)

    # ------------------------------------------------------------------------------------ reading

    def pending(self) -> bool:
        return self.path.exists()

    def header(self) -> dict[str, Any]:
        """The header of the file there is ({} when absent or unreadable)."""
        try:
            with open(self.path, "rb") as f:
                first = json.loads(f.readline())
        except (OSError, ValueError):
            return {}
        return first if isinstance(first, dict) and "motus_tracking_buffer" in first else {}

    @property
    def header_run_id(self) -> str | None:
        return self.header().get("run_id")

    def _start_offset(self) -> int:
        """Where replay goes on: the recorded offset when it belongs to this file, else just after the header."""
        with open(self.path, "rb") as f:
            f.readline()
            after_header = f.tell()
        try:
            recorded = json.loads(self.offset_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return after_header
        if not isinstance(recorded, dict) or recorded.get("id") != self.header().get("id"):
            return after_header  # an offset of an earlier buffer file (see the module's docstring)
        return max(after_header, int(recorded.get("offset", 0)))

    def entries(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(offset after the entry, entry) from where replay stopped last; None for a line that is not JSON (a
        write torn by a crash), which replay passes over."""
        if not self.pending():
            return
        start = self._start_offset()
        with open(self.path, "rb") as f:
            f.seek(start)
            for line in iter(f.readline, b""):
                end = f.tell()
                try:
                    entry = json.loads(line)
                except ValueError:
                    logger.warning("%s: passing over an unreadable line at byte %d (a write cut short by a crash)",
                                   self.path, end - len(line))
                    entry = None
                yield end, entry if isinstance(entry, dict) else None

    def pending_metric_steps(self) -> dict[str, int]:
        """The highest step per metric key among the entries still to replay."""
        top: dict[str, int] = {}
        for _, entry in self.entries():
            if entry and entry.get("kind") == "metrics":
                for key, _value, step, _ts in entry["metrics"]:
                    top[key] = max(top.get(key, step), step)
        return top

    # ------------------------------------------------------------------------------------ writing

    def append(self, entry: dict[str, Any], stash: Path | None = None, *, force: bool = False) -> bool:
        """Append `entry` (with a copy of `stash`, a file or folder, for an artifact); False when it was dropped at
        the cap. `force`: the run's end, a few bytes, never dropped (replay must be able to end the run)."""
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()  # NaN/inf as JSON's NaN/Infinity
        header = b""
        if not self.pending():
            header = (json.dumps({"motus_tracking_buffer": FORMAT, "id": uuid.uuid4().hex, "run_id": self.run_id},
                                 separators=(",", ":")) + "\n").encode()
            self._tail_checked = True
        extra = _tree_bytes(stash) if stash is not None else 0
        if not force and self._size + len(header) + len(line) + extra > self.cap_bytes:
            self._drop(entry)
            return False
        if stash is not None:
            rel = f"{uuid.uuid4().hex[:12]}/{stash.name}"
            dest = self.files / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if stash.is_dir():
                shutil.copytree(stash, dest)
            else:
                shutil.copy2(stash, dest)
            line = (json.dumps({**entry, "path": rel}, separators=(",", ":")) + "\n").encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            if not self._tail_checked:  # a buffer left by a process that died mid-write: keep lines separate
                self._tail_checked = True
                if f.tell() and not self._ends_with_newline():
                    header = b"\n"
            # flushed, not fsynced: a crashed process loses nothing written; a crashed machine loses its last
            # seconds, as it loses the steps since its last checkpoint anyway
            f.write(header + line)
        self._size += len(header) + len(line) + extra
        return True

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _drop(self, entry: dict[str, Any]) -> None:
        points = entry_points(entry)
        self.dropped += points
        if not self._warned:
            self._warned = True
            logger.warning(
                "tracking buffer %s is full (cap %g MB, MOTUS_TRACKING_BUFFER_MB): dropped %d point(s) of a %s "
                "batch; whatever else cannot be sent before the store answers is dropped too, counted, and the total "
                "is logged and tagged on the run (%s) when the buffer drains", self.path,
                self.cap_bytes / 1024 / 1024, points, entry.get("kind"), DROPPED_TAG)

    def mark(self, offset: int) -> None:
        """Record that everything before `offset` is replayed (atomically: a crash leaves the old or new offset)."""
        tmp = self.offset_path.with_name(self.offset_path.name + ".tmp")
        tmp.write_text(json.dumps({"id": self.header().get("id"), "offset": offset}), encoding="utf-8")
        os.replace(tmp, self.offset_path)

    def clear(self) -> None:
        """The buffer is replayed: the file first (one atomic unlink), then its offset and the artifact copies."""
        self.path.unlink(missing_ok=True)
        self.offset_path.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)
        self._size = 0
        self._tail_checked = False


# ---------------------------------------------------------------------------------------------- sending


def apply_entry(client: Any, run_id: str, entry: dict[str, Any], files: Path | None = None) -> None:
    """Send one entry to `run_id` through an `MlflowClient`: the one place entries become MLflow calls, for live
    sends and for replays alike. `files`: where a replayed artifact's copy lies (its `path` is relative to it)."""
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

    kind = entry.get("kind")
    if kind == "metrics":
        metrics = [Metric(key=k, value=float(v), timestamp=int(ts), step=int(s)) for k, v, s, ts in entry["metrics"]]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk, synchronous=True)
    elif kind == "params":
        params = [Param(k, v) for k, v in entry["params"].items()]
        for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk, synchronous=True)
    elif kind == "tags":
        tags = [RunTag(k, v) for k, v in entry["tags"].items()]
        for chunk in _chunks(tags, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk, synchronous=True)
    elif kind == "dataset":
        d = entry["dataset"]
        dataset = DatasetEntity(name=d["name"], digest=d["digest"], source_type=d["source_type"],
                                source=d["source"], schema=d.get("schema"), profile=d.get("profile"))
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(DATASET_CONTEXT_TAG, entry["context"])])])
    elif kind == "artifact":
        path = Path(entry["path"]) if files is None else files / entry["path"]
        if path.is_dir():
            client.log_artifacts(run_id, str(path), entry.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), entry.get("artifact_path"))
    elif kind == "end":
        if entry.get("dropped"):
            client.set_tag(run_id, DROPPED_TAG, str(entry["dropped"]))
        client.set_terminated(run_id, status=entry["status"])
    else:
        raise ValueError(f"unknown tracking buffer entry kind {kind!r}")


@dataclass
class Replayed:
    run_id: str | None
    entries: int
    points: int
    done: bool = True  # False: stopped at its time budget, the rest is still in the buffer


def drain(buffer: TrackingBuffer, send: Callable[[str, dict[str, Any]], None],
          deadline: float | None = None) -> Replayed:
    """Send the buffer's entries in order with `send(run_id, entry)`, recording the offset after each send; clear
    the buffer when all are sent. An exception of `send` stops the drain where it is (the offset says where).

    Consecutive metric entries go as one send of up to MAX_METRICS_PER_BATCH points (a long outage's thousands
    of steps replay in a few requests, not one each). `deadline` (a time.monotonic() value): stop after the send
    that passes it, so a training step that triggers a replay waits for a slice of it, not all of it."""
    import time

    run_id = buffer.header_run_id or buffer.run_id
    count = points = 0
    merged: list[list[Any]] = []
    merged_end = 0

    def flush() -> None:
        nonlocal merged
        if merged:
            send(run_id, {"kind": "metrics", "metrics": merged})
            buffer.mark(merged_end)
            merged = []

    for end, entry in buffer.entries():
        if deadline is not None and time.monotonic() >= deadline:
            flush()
            return Replayed(run_id, count, points, done=False)
        if entry is not None and entry.get("kind") == "metrics":
            if merged and len(merged) + len(entry["metrics"]) > MAX_METRICS_PER_BATCH:
                flush()
            merged.extend(entry["metrics"])
            merged_end = end
        else:
            flush()
            if entry is not None:
                send(run_id, entry)
            buffer.mark(end)
        if entry is not None:
            count += 1
            points += entry_points(entry) if entry.get("kind") != "end" else 0
    flush()
    buffer.clear()
    return Replayed(run_id, count, points)


def replay_buffer(folder: Path, client: Any) -> Replayed | None:
    """`motus track replay`: send a run folder's buffer through `client` (an `MlflowClient`, with MLflow's own
    retries); None when there is nothing to replay. Safe to run again after a failure: it goes on from the
    recorded offset."""
    buffer = TrackingBuffer(folder, None, cap_mb=float("inf"))
    if not buffer.pending():
        return None
    if not buffer.header_run_id:
        raise ValueError(f"{buffer.path} has no readable header naming its MLflow run; nothing can be replayed")
    return drain(buffer, lambda run_id, entry: apply_entry(client, run_id, entry, buffer.files))
