"""Read LeRobot datasets from disk (codebase v2.0, v2.1 and v3.0) into `Episode`s.

Mapping (all versions)::

    observation.images.<cam>  (dtype video or image)  -> frames[<cam>]     uint8 [T, H, W, 3]
    any other video/image feature <a.b.c>               -> frames[<c>]
    observation.state                                   -> state           float32 [T, S]
    action                                              -> actions         float32 [T, D]  (None if absent)
    the episode's tasks                                 -> instructions
    info.fps                                            -> fps
    embodiment argument, else info.robot_type, else "unknown" -> embodiment
    "lerobot:<root folder name>"                        -> source
    f"ep{episode_index:06d}"                            -> episode_id
    {"lerobot_version", "episode_index"}                -> extra

View names are the camera suffix with any character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (tier
member names are ``<episode>.<view>.<ext>``, so a view name may not contain a dot). ``views`` selects
cameras by that name or by the full feature key. ``compose_three_view=(head, left, right)`` composes those
three cameras into the official three-view image under the view name ``three_view``; the three source
cameras are then dropped unless they are also listed in ``views``.

v2.x layout (``codebase_version`` "v2.0"/"v2.1")::

    meta/info.json       fps, features, robot_type, chunks_size, total_episodes, data_path, video_path
    meta/episodes.jsonl  {"episode_index", "tasks": [str], "length"}   (absent: 0..total_episodes-1)
    meta/tasks.jsonl     {"task_index", "task"}                        (optional)
    data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet      one file per episode
    videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4   one file per camera+episode
    episode_chunk = episode_index // chunks_size

v3.0 layout -- assumptions, taken from LeRobot's 0.4 writer (``lerobot.datasets``), not its code::

    meta/info.json       as above; data_path "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                         video_path "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
                         (``video_path`` null when the dataset stores no videos)
    meta/episodes/chunk-*/file-*.parquet   one row per episode, all files concatenated in name order:
                         episode_index, tasks (list<string>), length, data/chunk_index, data/file_index,
                         dataset_from_index, dataset_to_index (global row range, end exclusive),
                         videos/<key>/chunk_index, videos/<key>/file_index,
                         videos/<key>/from_timestamp, videos/<key>/to_timestamp (seconds in that mp4),
                         plus stats/* columns, which are ignored
    meta/tasks.parquet   column task_index; the task text is the pandas index (stored as a column named
                         "__index_level_0__" or "task"; any string column is accepted)
    data/...parquet      many episodes per file, same per-frame columns as v2 (the rows of one episode are
                         selected by episode_index, else by the global ``index`` in [from, to))
    videos/...mp4        many episodes concatenated back to back per camera file

    The frame for row i of an episode is the frame of that camera's file presented nearest to
    ``from_timestamp + timestamp[i]`` (``timestamp`` is per-episode, starting at 0, as LeRobot writes and
    queries it); a frame further than half a frame period away is an error for that episode.

Image columns (dtype "image") are structs ``{bytes, path}`` holding PNG/JPEG bytes (a ``path`` relative to
the dataset root is read when ``bytes`` is null) or plain binary columns; both are decoded with PyAV.

Errors: a dataset-level problem raises ``SourceUnreadable`` when ``read_lerobot`` is called; a problem with
one episode (missing parquet or video, undecodable video or image, lengths that disagree, a missing
column) yields a ``SourceError`` for that episode and the read goes on.

Per-frame invariants the format declares are checked for every episode, each failure a coded ``SourceError``:
timestamps not negative, strictly increasing in frame order and 1/fps apart within ``timestamp_tolerance_s``
(``timestamps.*``); every row finds a frame within half a period and no decoded frame of the episode's span is
left without a row (``frames.*``; v2 videos are decoded whole, so trailing extra frames count); vector columns
and camera frames as wide as ``info.json``'s ``shape`` (``shape.mismatch``); an ``episode_index`` declared by
two metadata rows yields every claimant as ``episode.duplicate_id``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..episode import Episode
from ..episode import compose_three_view as _compose
from ..video import decode_image, read_video
from . import SourceError, SourceUnreadable

__all__ = ["read_lerobot"]

INFO = "meta/info.json"
V2_EPISODES = "meta/episodes.jsonl"
V2_TASKS = "meta/tasks.jsonl"
V3_EPISODES_DIR = "meta/episodes"
V3_TASKS = "meta/tasks.parquet"
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
IMAGE_PREFIX = "observation.images."
THREE_VIEW = "three_view"
_VIEW_BAD = re.compile(r"[^A-Za-z0-9_-]")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)")


class _EpisodeFailure(Exception):
    def __init__(self, file: Path | str, reason: str, code: str = "source.unreadable"):
        super().__init__(reason)
        self.file, self.reason, self.code = str(file), reason, code


@dataclass
class _Camera:
    key: str  # feature key, e.g. observation.images.top
    view: str  # view name, e.g. top
    kind: str  # "video" or "image"


@dataclass
class _EpisodeMeta:
    index: int
    length: int | None = None
    tasks: list[str] = field(default_factory=list)
    data_file: Path | None = None
    row_range: tuple[int, int] | None = None  # v3 global [from, to)
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # key -> (file, from_timestamp)
    claimed_at: str = ""  # the metadata file and row that declares it


@dataclass
class _Dataset:
    root: Path
    info: dict[str, Any]
    version: str
    major: int
    fps: float
    cameras: list[_Camera]
    episodes: dict[int, _EpisodeMeta]
    task_names: dict[int, str]
    episodes_file: Path
    episode_columns: set[str] = field(default_factory=set)  # v3: columns of meta/episodes
    # episode_index -> where each claimant of an index claimed more than once is declared ("file row N")
    duplicates: dict[int, list[str]] = field(default_factory=dict)
    timestamp_tolerance_s: float = 1e-4

    def claim(self, ep: _EpisodeMeta, where: str) -> None:
        """Record an episode's metadata row; a second claim on an index makes every claimant a duplicate."""
        if ep.index in self.episodes or ep.index in self.duplicates:
            first = self.episodes.pop(ep.index, None)
            claims = self.duplicates.setdefault(ep.index, [first.claimed_at] if first else [])
            claims.append(where)
            return
        ep.claimed_at = where
        self.episodes[ep.index] = ep

    def declared_width(self, key: str) -> int | None:
        """The per-frame width `info.json` declares for a vector feature (prod of its shape), or None."""
        spec = self.info["features"].get(key)
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and n > 0 for n in shape):
            return None
        return int(np.prod(shape)) if shape else 1

    def declared_image_size(self, key: str) -> tuple[int, int] | None:
        """(height, width) an image/video feature declares, read through its `names` when given."""
        spec = self.info["features"].get(key)
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(n, int) for n in shape):
            return None
        names = spec.get("names")
        if isinstance(names, list) and len(names) == 3 and {"height", "width"} <= set(map(str, names)):
            named = dict(zip(map(str, names), shape, strict=True))
            return named["height"], named["width"]
        return (shape[1], shape[2]) if shape[0] == 3 else (shape[0], shape[1])


# --------------------------------------------------------------------------------------------- public API


def read_lerobot(root: str | Path, *, views: list[str] | None = None, embodiment: str | None = None,
                 episodes: list[int] | None = None,
                 compose_three_view: tuple[str, str, str] | None = None,
                 timestamp_tolerance_s: float = 1e-4) -> Iterator[Episode | SourceError]:
    """Episodes of the LeRobot dataset at ``root`` (v2.0/v2.1/v3.0), in episode_index order.

    Raises ``SourceUnreadable`` (naming the file) right away when the dataset itself cannot be read or a
    requested view does not exist; per-episode problems come out of the iterator as ``SourceError``.
    """
    if compose_three_view is not None and len(compose_three_view) != 3:
        raise ValueError(f"compose_three_view needs (head, left_wrist, right_wrist), got {compose_three_view!r}")
    ds = _open_dataset(Path(root))
    if not (isinstance(timestamp_tolerance_s, (int, float)) and 0 < timestamp_tolerance_s < 0.5 / ds.fps):
        raise ValueError(f"timestamp_tolerance_s must be in (0, half a frame = {0.5 / ds.fps:g} s), "
                         f"got {timestamp_tolerance_s!r}")
    ds.timestamp_tolerance_s = float(timestamp_tolerance_s)
    by_name = {c.view: c for c in ds.cameras} | {c.key: c for c in ds.cameras}
    selected = list(views) if views is not None else ([] if compose_three_view else [c.view for c in ds.cameras])
    needed = selected + list(compose_three_view or ())
    missing = [v for v in needed if v not in by_name]
    if missing:
        raise SourceUnreadable(ds.root / INFO, f"no camera {missing} (cameras: {[c.view for c in ds.cameras]})")
    out_views = [by_name[v] for v in selected]
    load = list({by_name[v].key: by_name[v] for v in needed}.values())
    if ds.major == 3:
        for cam in load:
            if cam.kind == "video" and not all(c in ds.episode_columns for c in _v3_video_columns(cam.key)):
                raise SourceUnreadable(ds.episodes_file, f"no video location columns for {cam.key}")
    robot = embodiment or ds.info.get("robot_type") or "unknown"
    return _iterate(ds, out_views, load, compose_three_view, str(robot), episodes)


# ------------------------------------------------------------------------------------- dataset metadata


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise SourceUnreadable(path, "missing (not a LeRobot dataset root?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceUnreadable(path, f"bad JSON: {e}") from e
    except OSError as e:
        raise SourceUnreadable(path, f"unreadable: {e}") from e


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceUnreadable(path, f"unreadable: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceUnreadable(path, f"line {n}: bad JSON: {e}") from e
        if not isinstance(row, dict):
            raise SourceUnreadable(path, f"line {n}: expected a JSON object")
        rows.append(row)
    return rows


def _view_name(key: str) -> str:
    name = key[len(IMAGE_PREFIX):] if key.startswith(IMAGE_PREFIX) else key.rsplit(".", 1)[-1]
    return _VIEW_BAD.sub("_", name) or "view"


def _check_template(info_path: Path, name: str, template: str, **fields: Any) -> None:
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise SourceUnreadable(info_path, f"{name} template {template!r} is not usable ({e!r})") from e


def _open_dataset(root: Path) -> _Dataset:
    if not root.is_dir():
        raise SourceUnreadable(root, "dataset root is not a folder")
    info_path = root / INFO
    info = _load_json(info_path)
    if not isinstance(info, dict):
        raise SourceUnreadable(info_path, "expected a JSON object")
    version = info.get("codebase_version")
    m = _VERSION.match(version) if isinstance(version, str) else None
    major = int(m.group(1)) if m else None
    if major not in (2, 3):
        raise SourceUnreadable(info_path, f"unknown codebase_version {version!r} (supported: v2.0, v2.1, v3.0)")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise SourceUnreadable(info_path, f"fps {fps!r} must be a positive number")
    features = info.get("features")
    if not isinstance(features, dict):
        raise SourceUnreadable(info_path, "no 'features' object")
    cameras = []
    for key, spec in features.items():
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        if dtype in ("video", "image"):
            cameras.append(_Camera(key=key, view=_view_name(key), kind=dtype))
    views = [c.view for c in cameras]
    if len(set(views)) != len(views):
        raise SourceUnreadable(info_path, f"camera keys map to clashing view names {views}")
    info.setdefault("data_path", V2_DATA_PATH if major == 2 else V3_DATA_PATH)
    if info.get("video_path") is None and any(c.kind == "video" for c in cameras):
        info["video_path"] = V2_VIDEO_PATH if major == 2 else V3_VIDEO_PATH
    fields = dict(episode_chunk=0, episode_index=0, chunk_index=0, file_index=0, video_key="k")
    _check_template(info_path, "data_path", str(info["data_path"]), **fields)
    if info.get("video_path"):
        _check_template(info_path, "video_path", str(info["video_path"]), **fields)

    ds = _Dataset(root=root, info=info, version=str(version), major=major, fps=float(fps), cameras=cameras,
                  episodes={}, task_names={}, episodes_file=root / (V2_EPISODES if major == 2 else V3_EPISODES_DIR))
    if major == 2:
        _v2_metadata(ds)
    else:
        _v3_metadata(ds)
    return ds


def _as_tasks(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(t) for t in value if t is not None]


def _v2_metadata(ds: _Dataset) -> None:
    info_path = ds.root / INFO
    chunks = ds.info.get("chunks_size") or 1000
    if not isinstance(chunks, int) or chunks <= 0:
        raise SourceUnreadable(info_path, f"chunks_size {chunks!r} must be a positive integer")
    ds.info["chunks_size"] = chunks
    tasks_path = ds.root / V2_TASKS
    if tasks_path.is_file():
        for row in _load_jsonl(tasks_path):
            if "task_index" in row and "task" in row:
                ds.task_names[int(row["task_index"])] = str(row["task"])
    ep_path = ds.root / V2_EPISODES
    if ep_path.is_file():
        rows = _load_jsonl(ep_path)
        for n, row in enumerate(rows, 1):
            if not isinstance(row.get("episode_index"), int):
                raise SourceUnreadable(ep_path, f"line {n}: no integer episode_index")
            length = row.get("length")
            ds.claim(_EpisodeMeta(index=row["episode_index"], length=int(length) if isinstance(length, int) else None,
                                  tasks=_as_tasks(row.get("tasks"))), f"{V2_EPISODES} line {n}")
    elif isinstance(ds.info.get("total_episodes"), int):
        ds.episodes = {i: _EpisodeMeta(index=i) for i in range(ds.info["total_episodes"])}
    else:
        raise SourceUnreadable(ep_path, "missing, and meta/info.json has no total_episodes")
    for ep in ds.episodes.values():
        chunk = ep.index // chunks
        fields = dict(episode_chunk=chunk, episode_index=ep.index)
        ep.data_file = ds.root / ds.info["data_path"].format(**fields)
        for cam in ds.cameras:
            if cam.kind == "video":
                ep.videos[cam.key] = (ds.root / ds.info["video_path"].format(video_key=cam.key, **fields), 0.0)


def _v3_video_columns(key: str) -> tuple[str, str, str]:
    return f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"


def _read_parquet_meta(path: Path, columns_filter=None) -> pa.Table:
    try:
        schema = pq.read_schema(path)
        cols = [c for c in schema.names if columns_filter is None or columns_filter(c)]
        return pq.read_table(path, columns=cols)
    except (OSError, pa.ArrowException) as e:
        raise SourceUnreadable(path, f"unreadable parquet: {e}") from e


def _v3_metadata(ds: _Dataset) -> None:
    tasks_path = ds.root / V3_TASKS
    if tasks_path.is_file():
        table = _read_parquet_meta(tasks_path)
        names = table.column_names
        if "task_index" in names:
            text_col = next((c for c in ("task", "__index_level_0__") if c in names), None)
            if text_col is None:
                text_col = next((c for c in names if c != "task_index"
                                 and pa.types.is_string(table.schema.field(c).type)), None)
            if text_col is not None:
                for idx, text in zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist(),
                                     strict=True):
                    if idx is not None and text is not None:
                        ds.task_names[int(idx)] = str(text)
    ep_dir = ds.root / V3_EPISODES_DIR
    files = sorted(ep_dir.glob("*/*.parquet")) if ep_dir.is_dir() else []
    if not files:
        raise SourceUnreadable(ep_dir, "no episode metadata parquet files (meta/episodes/chunk-*/file-*.parquet)")
    columns: set[str] = set()
    for path in files:
        table = _read_parquet_meta(path, lambda c: not c.startswith("stats/"))
        columns |= set(table.column_names)
        for need in ("episode_index", "data/chunk_index", "data/file_index"):
            if need not in table.column_names:
                raise SourceUnreadable(path, f"no '{need}' column")
        for n, row in enumerate(table.to_pylist()):
            idx = row["episode_index"]
            if not isinstance(idx, int):
                raise SourceUnreadable(path, f"episode_index {idx!r} is not an integer")
            ep = _EpisodeMeta(index=idx, tasks=_as_tasks(row.get("tasks")))
            if isinstance(row.get("length"), int):
                ep.length = row["length"]
            lo, hi = row.get("dataset_from_index"), row.get("dataset_to_index")
            if isinstance(lo, int) and isinstance(hi, int):
                ep.row_range = (lo, hi)
                if ep.length is None:
                    ep.length = hi - lo
            try:
                ep.data_file = ds.root / ds.info["data_path"].format(
                    chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"]),
                    episode_index=idx, episode_chunk=0)
            except (TypeError, ValueError) as e:
                raise SourceUnreadable(path, f"episode {idx}: bad data/chunk_index or data/file_index ({e})") from e
            for cam in ds.cameras:
                c_chunk, c_file, c_from = _v3_video_columns(cam.key)
                if cam.kind != "video" or row.get(c_chunk) is None or row.get(c_file) is None:
                    continue
                file = ds.root / ds.info["video_path"].format(
                    video_key=cam.key, chunk_index=int(row[c_chunk]), file_index=int(row[c_file]),
                    episode_index=idx, episode_chunk=0)
                ep.videos[cam.key] = (file, float(row.get(c_from) or 0.0))
            ds.claim(ep, f"{path.relative_to(ds.root)} row {n}")
    ds.episode_columns = columns


# ------------------------------------------------------------------------------------------- episodes


def _iterate(ds: _Dataset, out_views: list[_Camera], load: list[_Camera],
             compose: tuple[str, str, str] | None, robot: str,
             wanted: list[int] | None) -> Iterator[Episode | SourceError]:
    cache: dict[Path, pa.Table] = {}
    indices = sorted(set(ds.episodes) | set(ds.duplicates)) if wanted is None else sorted({int(i) for i in wanted})
    for idx in indices:
        ref = f"ep{idx:06d}"
        for where in ds.duplicates.get(idx, []):
            # every claimant is a source episode of its own: each is accounted for, none is kept
            others = [w for w in ds.duplicates[idx] if w != where]
            yield SourceError(ref, str(ds.root / where.split(" ")[0]),
                              f"episode_index {idx} declared at {where} is also declared at {', '.join(others)}",
                              "episode.duplicate_id")
        meta = ds.episodes.get(idx)
        if meta is None and idx in ds.duplicates:
            continue
        if meta is None:
            yield SourceError(ref, str(ds.episodes_file), f"episode {idx} is not in the dataset")
            continue
        try:
            yield _episode(ds, meta, out_views, load, compose, robot, cache)
        except _EpisodeFailure as e:
            yield SourceError(ref, e.file, e.reason, e.code)
        except Exception as e:  # noqa: BLE001 - one bad episode must never abort the read
            yield SourceError(ref, str(meta.data_file), f"unexpected {type(e).__name__}: {e}", "source.unexpected")


def _data_table(path: Path, cache: dict[Path, pa.Table]) -> pa.Table:
    if path not in cache:
        if not path.is_file():
            raise _EpisodeFailure(path, "missing data parquet", "file.missing")
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise _EpisodeFailure(path, f"unreadable data parquet: {e}", "file.unreadable") from e
        cache.clear()  # episodes come in index order, so one file at a time is enough (v3 packs many)
        cache[path] = table
    return cache[path]


def _episode_rows(ds: _Dataset, meta: _EpisodeMeta, cache: dict[Path, pa.Table]) -> pa.Table:
    assert meta.data_file is not None
    table = _data_table(meta.data_file, cache)
    names = table.column_names
    if "episode_index" in names:
        table = table.filter(pc.equal(table["episode_index"], pa.scalar(meta.index, table.schema.field("episode_index").type)))
    elif meta.row_range is not None and "index" in names:
        lo, hi = meta.row_range
        table = table.filter(pc.and_(pc.greater_equal(table["index"], lo), pc.less(table["index"], hi)))
    elif ds.major == 3:
        raise _EpisodeFailure(meta.data_file, "no episode_index or index column to find the episode's rows",
                              "rows.unlocatable")
    if "frame_index" in names:
        table = table.sort_by("frame_index")
    if table.num_rows == 0:
        raise _EpisodeFailure(meta.data_file, f"no rows for episode {meta.index}", "rows.missing")
    if meta.length is not None and table.num_rows != meta.length:
        raise _EpisodeFailure(meta.data_file, f"length mismatch: episode metadata says {meta.length} frames, "
                                              f"the parquet holds {table.num_rows} rows", "rows.count_mismatch")
    return table


def _vectors(table: pa.Table, name: str, file: Path) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if col.null_count:
        raise _EpisodeFailure(file, f"column '{name}' has {col.null_count} null row(s)", "column.null")
    n = len(col)
    arr = col
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr)
        if len(lengths) and pc.min_max(lengths)["min"].as_py() != pc.min_max(lengths)["max"].as_py():
            raise _EpisodeFailure(file, f"column '{name}' has rows of different lengths", "column.ragged")
        arr = arr.flatten()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
        raise _EpisodeFailure(file, f"column '{name}' is {col.type}, not numeric", "column.dtype")
    if arr.null_count:
        raise _EpisodeFailure(file, f"column '{name}' holds null values", "column.null")
    values = arr.to_numpy(zero_copy_only=False).astype(np.float32)
    if n == 0 or values.size % n:
        raise _EpisodeFailure(file, f"column '{name}': {values.size} values do not split into {n} rows",
                              "column.ragged")
    return values.reshape(n, -1)


def _timestamps(ds: _Dataset, table: pa.Table, file: Path) -> np.ndarray:
    """Each row's time in the episode (seconds), checked against what the format declares: not negative,
    strictly increasing in frame order, and one frame period (1/fps) apart within the tolerance (LeRobot's
    own check uses 1e-4 s). Any of these broken means a frame would be paired with another row's action."""
    if "timestamp" in table.column_names:
        ts = _vectors(table, "timestamp", file)[:, 0].astype(np.float64)
    elif "frame_index" in table.column_names:
        ts = _vectors(table, "frame_index", file)[:, 0].astype(np.float64) / ds.fps
    else:
        return np.arange(table.num_rows, dtype=np.float64) / ds.fps
    if (ts < 0).any():
        i = int(np.argmax(ts < 0))
        raise _EpisodeFailure(file, f"timestamp {ts[i]:.4f} s at row {i} is negative "
                                    f"({int((ts < 0).sum())} negative row(s))", "timestamps.negative")
    step = np.diff(ts)
    if (step <= 0).any():
        i = int(np.argmax(step <= 0)) + 1
        raise _EpisodeFailure(file, f"row {i} at {ts[i]:.4f} s does not follow row {i - 1} at {ts[i - 1]:.4f} s "
                                    f"({int((step <= 0).sum())} step(s) out of order)", "timestamps.non_monotonic")
    period = 1.0 / ds.fps
    # float32 timestamps lose precision as they grow: allow their rounding on top of the tolerance
    tol = ds.timestamp_tolerance_s + 2 * np.spacing(ts[1:].astype(np.float32)).astype(np.float64)
    off = np.abs(step - period) > tol
    if off.any():
        i = int(np.argmax(off)) + 1
        raise _EpisodeFailure(file, f"rows {i - 1}->{i} are {step[i - 1] * 1000:.2f} ms apart, fps {ds.fps:g} "
                                    f"says {period * 1000:.2f} ms (tolerance {ds.timestamp_tolerance_s * 1000:g} ms; "
                                    f"{int(off.sum())} step(s) off)", "timestamps.fps_mismatch")
    return ts


def _video_frames(ds: _Dataset, cam: _Camera, meta: _EpisodeMeta, ts: np.ndarray) -> np.ndarray:
    if cam.key not in meta.videos:
        raise _EpisodeFailure(ds.episodes_file, f"no video location for camera {cam.key}", "video.missing")
    path, offset = meta.videos[cam.key]
    if not path.is_file():
        raise _EpisodeFailure(path, f"missing video for camera {cam.key}", "video.missing")
    tol = 0.5 / ds.fps
    query = offset + ts
    start = float(query.min()) - tol
    # one file per episode (v2): decode it whole, so frames beyond the last row are counted too
    whole = ds.major == 2
    try:
        video = read_video(path, start_s=None if whole or start <= 0 else start,
                           end_s=None if whole else float(query.max()) + tol)
    except (ValueError, OSError) as e:  # VideoDecodeError is a ValueError
        raise _EpisodeFailure(path, f"undecodable video for camera {cam.key}: {e}", "video.undecodable") from e
    times = video.times
    if len(times) == 0:
        raise _EpisodeFailure(path, f"camera {cam.key}: no frames between {start:.3f}s and {query.max() + tol:.3f}s",
                              "video.no_frames")
    right = np.clip(np.searchsorted(times, query), 0, len(times) - 1)
    left = np.clip(right - 1, 0, len(times) - 1)
    pick = np.where(np.abs(times[left] - query) <= np.abs(times[right] - query), left, right)
    err = np.abs(times[pick] - query)
    if (err > tol + 1e-6).any():
        bad = int(np.argmax(err > tol + 1e-6))
        raise _EpisodeFailure(path, f"camera {cam.key}: video has {len(times)} frame(s) for {len(query)} rows; "
                                    f"no frame within {tol * 1000:.1f} ms of row {bad} (t={query[bad]:.3f}s)",
                              "frames.timestamp_gap")
    # every row finds its frame; now the other way round: a frame between the rows that no row takes means
    # rows are missing from the parquet (or frames were inserted), and the actions would pair with the wrong
    # frames after the gap
    inside = len(times) if whole else int(((times >= query.min() - tol) & (times <= query.max() + tol)).sum())
    if inside != len(query):
        raise _EpisodeFailure(path, f"camera {cam.key}: {inside} decoded frames span the episode's "
                                    f"{len(query)} rows ({query.min():.3f}s..{query.max():.3f}s)",
                              "frames.count_mismatch")
    return video.frames[pick]


def _image_frames(ds: _Dataset, cam: _Camera, table: pa.Table, file: Path) -> np.ndarray:
    if cam.key not in table.column_names:
        raise _EpisodeFailure(file, f"no image column '{cam.key}'", "image.missing")
    images = []
    for i, cell in enumerate(table.column(cam.key).to_pylist()):
        data = cell
        if isinstance(cell, dict):
            data = cell.get("bytes")
            if data is None and cell.get("path"):
                img_path = ds.root / str(cell["path"])
                try:
                    data = img_path.read_bytes()
                except OSError as e:
                    raise _EpisodeFailure(img_path, f"camera {cam.key} row {i}: unreadable image file ({e})",
                                          "image.missing") from e
        if not isinstance(data, (bytes, bytearray)):
            raise _EpisodeFailure(file, f"camera {cam.key} row {i}: no image bytes", "image.missing")
        try:
            images.append(decode_image(data))
        except ValueError as e:
            raise _EpisodeFailure(file, f"camera {cam.key} row {i}: {e}", "image.undecodable") from e
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise _EpisodeFailure(file, f"camera {cam.key}: images of different sizes {sorted(shapes)}", "image.size")
    return np.stack(images)


def _episode(ds: _Dataset, meta: _EpisodeMeta, out_views: list[_Camera], load: list[_Camera],
             compose: tuple[str, str, str] | None, robot: str, cache: dict[Path, pa.Table]) -> Episode:
    assert meta.data_file is not None
    table = _episode_rows(ds, meta, cache)
    file = meta.data_file
    ts = _timestamps(ds, table, file)

    loaded: dict[str, np.ndarray] = {}
    for cam in load:
        loaded[cam.key] = (_video_frames(ds, cam, meta, ts) if cam.kind == "video"
                           else _image_frames(ds, cam, table, file))
    frames = {cam.view: loaded[cam.key] for cam in out_views}
    if compose is not None:
        by_name = {c.view: c for c in ds.cameras} | {c.key: c for c in ds.cameras}
        head, left, right = (loaded[by_name[v].key] for v in compose)
        try:
            frames[THREE_VIEW] = _compose(head, left, right)
        except ValueError as e:
            raise _EpisodeFailure(file, f"three-view composition failed: {e}", "frames.compose") from e

    for cam in load:
        size = ds.declared_image_size(cam.key)
        if size is not None and tuple(loaded[cam.key].shape[1:3]) != size:
            raise _EpisodeFailure(file, f"camera {cam.key}: frames are {loaded[cam.key].shape[1]}x"
                                        f"{loaded[cam.key].shape[2]}, info.json declares {size[0]}x{size[1]}",
                                  "shape.mismatch")

    actions = _vectors(table, ACTION_KEY, file) if ACTION_KEY in table.column_names else None
    state = _vectors(table, STATE_KEY, file) if STATE_KEY in table.column_names else None
    declared = {}
    for name, key, values in (("actions", ACTION_KEY, actions), ("state", STATE_KEY, state)):
        width = ds.declared_width(key)
        if width is None:
            continue
        declared[name] = width
        if values is not None and values.shape[1] != width:
            raise _EpisodeFailure(file, f"column '{key}' is {values.shape[1]}-d, info.json declares "
                                        f"shape {ds.info['features'][key]['shape']}", "shape.mismatch")

    instructions = list(meta.tasks)
    if not instructions and "task_index" in table.column_names:
        seen: dict[int, None] = {}
        for t in table.column("task_index").to_pylist():
            if t is not None:
                seen.setdefault(int(t), None)
        instructions = [ds.task_names[t] for t in seen if t in ds.task_names]

    return Episode(
        episode_id=f"ep{meta.index:06d}", frames=frames, actions=actions, state=state,
        instructions=instructions, fps=ds.fps, embodiment=robot, source=f"lerobot:{ds.root.name}",
        extra={"lerobot_version": ds.version, "episode_index": meta.index}, declared=declared,
    )
