"""Tier storage: a folder of tar shards (WebDataset naming) plus `manifest.json` and `episodes.jsonl`.

    <tier>/manifest.json      name, level, embodiment(s), action/state dims, fps, counts, statistics,
                              every shard's sha256, schema version, source description, content hash
    <tier>/episodes.jsonl     one line per episode: id, shard, frames, embodiment, native action dim
    <tier>/quarantine.jsonl   episodes ingest refused, each with one-line coded reasons (written by ingest)
    <tier>/ingest.log         the untruncated detail of every quarantine reason, and the kept episodes that
                              have no instruction (tab-separated: episode, code, file, detail)
    <tier>/shards/shard-000000.tar ...

Shards, not one file per frame or episode: DVC and object stores slow badly past ~1e5 files. Shards are
written deterministically (sorted members, zero mtimes/owners), so rebuilding the same episodes gives the
same bytes and the same DVC hash. A tier is written into a temporary sibling folder and renamed into place
only when complete, so a failed ingest never destroys the previous good tier.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts import MANIFEST_FILE, ContractError, TierManifest
from .episode import Episode
from .video import decode_frames, encode_frames

MANIFEST = MANIFEST_FILE
INDEX = "episodes.jsonl"
QUARANTINE = "quarantine.jsonl"
INGEST_LOG = "ingest.log"
SHARD_DIR = "shards"
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024


class TierError(Exception):
    """A tier folder that cannot be read or does not match its manifest; the message names the file."""


# --------------------------------------------------------------------------------------------- statistics


class RunningStats:
    """Per-dimension count/mean/std/min/max (Welford over batches) and 1st/99th percentiles from a reservoir."""

    def __init__(self, reservoir: int = 100_000, seed: int = 0):
        self.n, self.mean, self.m2 = 0, None, None
        self.min = self.max = None
        self._rows: np.ndarray | None = None  # the reservoir, allocated once; the first `filled` rows are in use
        self.filled = 0
        self.cap, self.seen = reservoir, 0
        self.rng = np.random.default_rng(seed)

    @property
    def reservoir(self) -> np.ndarray:
        return self._rows[: self.filled]

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        if len(x) == 0:
            return
        if self.mean is None:
            d = x.shape[1]
            self.mean, self.m2 = np.zeros(d), np.zeros(d)
            self.min, self.max = np.full(d, np.inf), np.full(d, -np.inf)
            self._rows = np.empty((self.cap, d))
        n_b, mean_b = len(x), x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        delta, total = mean_b - self.mean, self.n + n_b
        self.mean = self.mean + delta * n_b / total
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / total
        self.n = total
        self.min, self.max = np.minimum(self.min, x.min(0)), np.maximum(self.max, x.max(0))
        # reservoir sampling keeps the quantiles honest without holding every row; filled in place and drawn a
        # batch at a time (a tier of a million episodes updates this millions of times: no per-row Python, no
        # copy of the reservoir per call)
        free = self.cap - self.filled
        if free > 0:
            take = x[:free]
            self._rows[self.filled: self.filled + len(take)] = take
            self.filled += len(take)
            self.seen += len(take)
            x = x[free:]
        if len(x):
            # row k of the batch is the (seen + k + 1)-th row seen: it replaces slot j ~ U[0, seen + k + 1)
            j = (self.rng.random(len(x)) * (self.seen + 1 + np.arange(len(x)))).astype(np.int64)
            self.seen += len(x)
            keep = np.flatnonzero(j < self.cap)
            # a slot drawn twice keeps the later row, as one row at a time would (numpy does not promise an
            # order for repeated indices, so the later one is picked explicitly)
            _, last_from_end = np.unique(j[keep][::-1], return_index=True)
            pick = keep[len(keep) - 1 - last_from_end]
            self._rows[j[pick]] = x[pick]

    def to_dict(self) -> dict[str, Any] | None:
        if not self.n:
            return None
        std = np.sqrt(self.m2 / max(self.n, 1))
        q01, q99 = np.quantile(self.reservoir, [0.01, 0.99], axis=0)
        r = lambda a: [round(float(v), 6) for v in a]  # noqa: E731 - short local formatter
        return {"count": int(self.n), "mean": r(self.mean), "std": r(std), "min": r(self.min), "max": r(self.max),
                "q01": r(q01), "q99": r(q99)}


# ------------------------------------------------------------------------------------------------ writing


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _record(name: str, data: bytes) -> bytes:
    """One member as `_add` writes it (USTAR header, data, zero padding to the block): a header holds no
    offset, so a worker process can make it and the writer append the bytes as they are."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    pad = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape") + data + tarfile.NUL * pad


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def swap_into_place(tmp: Path, out: Path) -> None:
    """Move a finished folder over `out`; the old one survives until the new one is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class TierSpec:
    name: str
    level: int
    embodiment: str
    action_dim: int | None
    fps: float | None = None
    action_names: tuple[str, ...] | None = None
    codec: str = "mp4"
    pad_state: bool = False  # mixed-embodiment tiers: narrower state is zero-padded like actions
    shard_bytes: int = DEFAULT_SHARD_BYTES
    source: dict[str, Any] | None = None
    description: str = ""


@dataclass
class PreparedEpisode:
    """One episode as its shard will hold it (encoded members, in member order) plus what the writer's
    running totals take from it. Depends only on the episode and the tier's spec, so ingest can make it in
    worker processes and hand it to the one writer."""

    episode_id: str
    records: bytes  # every member's tar record, in member order (views, actions, state, meta)
    size: int  # the members' data bytes (what a shard's size limit counts)
    actions: np.ndarray | None  # float32, padded into the tier's action space: the statistics' input
    state: np.ndarray | None
    views: list[tuple[str, list[int]]]  # (view, [H, W]) in the source's camera order
    fps: float
    native_action_dim: int | None
    frames: int
    embodiment: str
    instructions: list[str]


def prepare_episode(spec: TierSpec, ep: Episode) -> PreparedEpisode:
    """The per-episode CPU work of writing a tier: frames to npz/mp4 bytes, arrays to .npy, the metadata."""
    members: list[tuple[str, bytes]] = []
    views: list[tuple[str, list[int]]] = []
    fps = float(spec.fps or ep.fps)
    for view in ep.frames:  # the source's camera order: its first camera is the view a window takes by default
        data, ext = encode_frames(ep.frames[view], spec.codec, fps)
        members.append((f"{ep.episode_id}.{view}.{ext}", data))
        views.append((view, list(ep.frames[view].shape[1:3])))
    native = ep.action_dim
    actions = state = None
    if ep.actions is not None:
        actions = ep.actions.astype(np.float32)
        if spec.action_dim and native < spec.action_dim:
            actions = np.pad(actions, ((0, 0), (0, spec.action_dim - native)))
        members.append((f"{ep.episode_id}.actions.npy", _npy(actions)))
    if ep.state is not None:
        state = ep.state.astype(np.float32)
        if spec.action_dim and spec.pad_state and state.shape[1] < spec.action_dim:
            state = np.pad(state, ((0, 0), (0, spec.action_dim - state.shape[1])))
        members.append((f"{ep.episode_id}.state.npy", _npy(state)))
    meta = ep.metadata()
    meta["native_action_dim"] = native
    meta["view_order"] = list(ep.frames)  # `views` is a mapping the sorted-key JSON reorders; older shards lack it
    members.append((f"{ep.episode_id}.meta.json", json.dumps(meta, sort_keys=True).encode()))
    return PreparedEpisode(episode_id=ep.episode_id, records=b"".join(_record(n, d) for n, d in members),
                           size=sum(len(d) for _, d in members), actions=actions, state=state, views=views,
                           fps=fps, native_action_dim=native, frames=ep.num_frames, embodiment=ep.embodiment,
                           instructions=list(ep.instructions))


class TierWriter:
    """Append episodes; `close()` writes the manifest and moves the finished tier into place atomically."""

    def __init__(self, out_dir: str | Path, spec: TierSpec):
        self.out = Path(out_dir)
        self.spec = spec
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self.tmp / SHARD_DIR).mkdir()
        self._tar: io.BufferedWriter | None = None  # the open shard: our tar records appended as bytes
        self._shard_idx = -1
        self._shard_bytes = 0
        self.shards: list[dict[str, Any]] = []
        self.index: list[dict[str, Any]] = []
        self.quarantine: list[dict[str, Any]] = []
        self.action_stats, self.state_stats = RunningStats(), RunningStats()
        self.frames = 0
        self.views: dict[str, list[int]] = {}
        self.embodiments: dict[str, dict[str, Any]] = {}
        self.fps_values: set[float] = set()
        self.state_dim: int | None = None
        self._ids: set[str] = set()
        self._withdrawn: set[str] = set()
        self.log_lines: list[str] = []  # ingest.log
        self.source_episodes: int | None = None  # set by ingest: what the source yielded, kept or not
        self.without_instruction = 0

    # -- shards -------------------------------------------------------------------------------------------
    def _shard_path(self, i: int) -> Path:
        return self.tmp / SHARD_DIR / f"shard-{i:06d}.tar"

    def _roll(self) -> None:
        self._finish_shard()
        self._shard_idx += 1
        self._tar = open(self._shard_path(self._shard_idx), "wb")  # noqa: SIM115 - closed by _finish_shard
        self._shard_bytes = 0
        self.shards.append({"name": f"{SHARD_DIR}/shard-{self._shard_idx:06d}.tar", "episodes": 0})

    def _finish_shard(self) -> None:
        if self._tar is not None:
            # the end of archive exactly as tarfile writes it: two zero blocks, then zeros to a whole record
            end = self._tar.tell() + 2 * tarfile.BLOCKSIZE
            self._tar.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))
            self._tar.close()
            self._tar = None
            p = self._shard_path(self._shard_idx)
            self.shards[-1].update(sha256=sha256_file(p), bytes=p.stat().st_size)

    # -- episodes -----------------------------------------------------------------------------------------
    def add(self, ep: Episode) -> None:
        """Store one episode that already passed validation. Actions narrower than the tier are zero-padded
        into the tier's action space; the native width is recorded."""
        if ep.episode_id in self._ids:
            raise ValueError(f"duplicate episode id '{ep.episode_id}' in tier '{self.spec.name}'")
        problem = self.state_problem(ep)
        if problem:
            raise ValueError(f"episode '{ep.episode_id}': {problem}")
        self.add_prepared(prepare_episode(self.spec, ep))

    def add_prepared(self, p: PreparedEpisode) -> None:
        """Append an episode `prepare_episode` already encoded: everything here depends on the episodes
        written before it (shard roll-over, statistics, the tier's state width), so calls must come in the
        order the tier is to hold them."""
        if p.episode_id in self._ids:
            raise ValueError(f"duplicate episode id '{p.episode_id}' in tier '{self.spec.name}'")
        if p.state is not None and self.state_dim is not None and p.state.shape[1] != self.state_dim:
            raise ValueError(f"episode '{p.episode_id}': state is {p.state.shape[1]}-d, "
                             f"tier '{self.spec.name}' stores {self.state_dim}-d state")
        self._ids.add(p.episode_id)
        for view, shape in p.views:
            self.views.setdefault(view, shape)
        if p.actions is not None:
            self.action_stats.update(p.actions)
        if p.state is not None:
            self.state_stats.update(p.state)
            self.state_dim = int(p.state.shape[1])

        if self._tar is None or (self._shard_bytes and self._shard_bytes + p.size > self.spec.shard_bytes):
            self._roll()
        self._tar.write(p.records)
        self._shard_bytes += p.size
        self.shards[-1]["episodes"] += 1
        self.frames += p.frames
        self.fps_values.add(p.fps)
        emb = self.embodiments.setdefault(p.embodiment, {"episodes": 0, "frames": 0,
                                                         "action_dim": p.native_action_dim})
        emb["episodes"] += 1
        emb["frames"] += p.frames
        self.index.append({"id": p.episode_id, "shard": self._shard_idx, "frames": p.frames,
                           "embodiment": p.embodiment, "native_action_dim": p.native_action_dim,
                           "instructions": p.instructions})

    def state_problem(self, ep: Episode) -> str | None:
        """A state width that disagrees with the tier's earlier episodes (after padding), or None."""
        if ep.state is None or self.state_dim is None or ep.state.ndim != 2:
            return None
        width = ep.state.shape[1]
        if self.spec.action_dim and self.spec.pad_state:
            width = max(width, self.spec.action_dim)
        if width != self.state_dim:
            return f"state is {width}-d, the tier's other episodes have {self.state_dim}-d state"
        return None

    def add_quarantined(self, record: dict[str, Any]) -> None:
        self.quarantine.append(record)

    def withdraw(self, episode_id: str) -> dict[str, Any]:
        """Take back a stored episode (a later source episode claimed its id, so neither can be trusted);
        returns its index record. Its shard is rewritten without it, and the tier's statistics recounted,
        at `close()`."""
        rec = next((r for r in self.index if r["id"] == episode_id), None)
        if rec is None:
            raise KeyError(f"tier '{self.spec.name}' holds no episode '{episode_id}' to withdraw")
        self.index.remove(rec)
        self._withdrawn.add(episode_id)
        return rec

    def _rewrite_without_withdrawn(self) -> None:
        """Drop withdrawn episodes' members from their shards, then recount everything the manifest states
        from what remains, so no number in it counts an episode the tier does not hold."""
        prefixes = tuple(f"{i}." for i in self._withdrawn)
        for i, shard in enumerate(self.shards):
            path = self._shard_path(i)
            with tarfile.open(path) as tar:
                members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
            if not any(n.startswith(prefixes) for n, _ in members):
                continue
            kept = [(n, d) for n, d in members if not n.startswith(prefixes)]
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for name, data in kept:
                    _add(tar, name, data)
            shard.update(episodes=sum(1 for n, _ in kept if n.endswith(".meta.json")), sha256=sha256_file(path),
                         bytes=path.stat().st_size)
        self.action_stats, self.state_stats = RunningStats(), RunningStats()
        self.frames, self.views, self.embodiments, self.fps_values = 0, {}, {}, set()
        for rec in self.index:
            with tarfile.open(self._shard_path(rec["shard"])) as tar:
                read = lambda key, rec=rec, tar=tar: tar.extractfile(f"{rec['id']}.{key}").read()  # noqa: E731
                names = set(tar.getnames())
                meta = json.loads(read("meta.json"))
                for key, stats in (("actions", self.action_stats), ("state", self.state_stats)):
                    if f"{rec['id']}.{key}.npy" in names:
                        stats.update(np.load(io.BytesIO(read(f"{key}.npy"))))
            for view in meta.get("view_order") or meta["views"]:
                self.views.setdefault(view, list(meta["views"][view]))
            self.frames += rec["frames"]
            self.fps_values.add(float(self.spec.fps or meta["fps"]))
            emb = self.embodiments.setdefault(rec["embodiment"], {"episodes": 0, "frames": 0,
                                                                  "action_dim": rec["native_action_dim"]})
            emb["episodes"] += 1
            emb["frames"] += rec["frames"]

    def close(self) -> TierManifest:
        self._finish_shard()
        if self._withdrawn:
            self._rewrite_without_withdrawn()
        if not self.index:
            self.abort()
            raise TierError(f"tier '{self.spec.name}': no valid episodes to write")
        if self.source_episodes is not None and self.source_episodes != len(self.index) + len(self.quarantine):
            self.abort()  # an episode in no record at all is the failure this count exists to catch
            raise TierError(f"tier '{self.spec.name}': the source yielded {self.source_episodes} episodes but "
                            f"{len(self.index)} were kept and {len(self.quarantine)} quarantined")
        manifest = self._manifest()
        write_jsonl(self.tmp / INDEX, self.index)
        write_jsonl(self.tmp / QUARANTINE, self.quarantine)
        (self.tmp / INGEST_LOG).write_text("".join(line + "\n" for line in self.log_lines))
        (self.tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
        swap_into_place(self.tmp, self.out)
        return manifest

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _manifest(self) -> TierManifest:
        index_hash = hashlib.sha256("".join(json.dumps(r, sort_keys=True) for r in self.index).encode()).hexdigest()
        content = hashlib.sha256(
            (index_hash + "".join(s["sha256"] for s in self.shards)).encode()).hexdigest()
        embodiments = sorted(self.embodiments)
        return TierManifest(
            tier=self.spec.name,
            level=self.spec.level,
            embodiment=embodiments[0] if len(embodiments) == 1 else self.spec.embodiment,
            embodiments=self.embodiments,
            action_dim=self.spec.action_dim,
            action_names=tuple(self.spec.action_names) if self.spec.action_names else None,
            state_dim=self.state_dim,
            fps=sorted(self.fps_values)[0] if len(self.fps_values) == 1 else None,
            fps_values=tuple(sorted(self.fps_values)),
            episodes=len(self.index),
            frames=self.frames,
            quarantined=len(self.quarantine),
            source_episodes=self.source_episodes,
            without_instruction=self.without_instruction,
            views=self.views,
            codec=self.spec.codec,
            shards=tuple(self.shards),
            action_stats=self.action_stats.to_dict(),
            state_stats=self.state_stats.to_dict(),
            source=self.spec.source or {},
            description=self.spec.description,
            index_sha256=index_hash,
            content_hash=content,
        )


# ------------------------------------------------------------------------------------------------ reading


def shard_members(path: Path) -> dict[str, tuple[int, int]]:
    """Every member of a shard: name -> (offset of its data, size).

    The shards are our own USTAR archives of regular files, so their headers are read straight from a memory
    map (name, size, type): `tarfile` parses every field of every header in Python, ~60 us a member, which is
    seconds for a shard of 10^5 small episodes before a loader's first window. Anything else (another
    format, a link, a long-name extension) is read by `tarfile`."""
    import mmap

    out: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            end, off = len(mm), 0
            while off + 512 <= end:
                header = mm[off: off + 512]
                if header[0] == 0:  # the end-of-archive zero blocks
                    return out
                if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0") or header[345] != 0:
                    break
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
                out[name] = (off + 512, size)
                off += 512 + (size + 511) // 512 * 512
            else:
                return out
    with tarfile.open(path) as tar:  # not a plain archive of ours: the general reader
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


# the episode index's columns as the writer writes them; older or newer fields are read as they come
_INDEX_COLUMNS = (("id", "string"), ("shard", "int64"), ("frames", "int64"), ("embodiment", "string"),
                  ("native_action_dim", "int64"), ("instructions", "list<string>"))


class _IndexColumns:
    """The columns of `episodes.jsonl` the readers need: ids, shard and frame count as arrays, instructions per row.

    Parsed by Arrow's multithreaded JSON reader where pyarrow is installed (a few bytes per episode; 10^6 rows
    in about a second). A bare GPU node's offline bundle carries no pyarrow (its wheel alone is two thirds of
    the bundle's size budget), so there the same columns come from the standard library's parser, line by line:
    slower, but the tiers a node reads directly are small ones.
    """

    def __init__(self, ids: list[str], shards: np.ndarray, frames: np.ndarray, instructions: Any):
        self.ids, self.shards, self.frames, self._instructions = ids, shards, frames, instructions

    def __len__(self) -> int:
        return len(self.ids)

    def instructions(self, row: int) -> list[str]:
        got = self._instructions[row]
        return (got.as_py() if hasattr(got, "as_py") else got) or []

    @classmethod
    def read(cls, path: Path) -> _IndexColumns:
        try:
            import pyarrow as pa
            import pyarrow.json as pj
        except ImportError:
            return cls._read_stdlib(path)
        types = {"string": pa.string(), "int64": pa.int64(), "list<string>": pa.list_(pa.string())}
        schema = pa.schema([(name, types[t]) for name, t in _INDEX_COLUMNS])
        try:
            table = pj.read_json(path, parse_options=pj.ParseOptions(explicit_schema=schema,
                                                                     unexpected_field_behavior="infer"))
        except pa.ArrowInvalid as e:
            raise TierError(f"{path}: unreadable episode index ({e})") from None
        return cls(table.column("id").to_pylist(), table.column("shard").to_numpy(),
                   table.column("frames").to_numpy(), table.column("instructions"))

    @classmethod
    def _read_stdlib(cls, path: Path) -> _IndexColumns:
        ids, shards, frames, instructions = [], [], [], []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ids.append(rec["id"])
                    shards.append(int(rec["shard"]))
                    frames.append(int(rec["frames"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise TierError(f"{path}:{n}: unreadable episode index ({type(e).__name__}: {e})") from None
                instructions.append(rec.get("instructions") or [])
        return cls(ids, np.asarray(shards, dtype=np.int64), np.asarray(frames, dtype=np.int64), instructions)


class Tier:
    """Read access to a finished tier: the manifest, the episode index, and episodes by id.

    Opening reads only the manifest: `motus data status` of a tier of a million episodes must not parse a
    million index lines. The index is read when first needed, as columns (`table`, parsed by Arrow's
    multithreaded JSON reader, a few bytes per episode) for the loader and the lookups here; `index`, the
    records as dicts, is there for small tiers and tools (it costs ~0.5 kB of Python objects per episode).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = TierManifest.read(self.path)
        except ContractError as e:
            raise TierError(str(e)) from None
        if not (self.path / INDEX).is_file():
            raise TierError(f"{self.path / INDEX}: missing (the tier was not completely written)")
        self._members: dict[int, dict[str, tuple[int, int]]] = {}
        self._table: Any = None
        self._index: list[dict[str, Any]] | None = None
        self._rows: dict[str, int] | None = None
        self._shard_of: np.ndarray | None = None

    @property
    def table(self) -> _IndexColumns:
        """The episode index as columns (one row per episode, in index order), read on first use."""
        if self._table is None:
            self._table = _IndexColumns.read(self.path / INDEX)
        return self._table

    @property
    def index(self) -> list[dict[str, Any]]:
        """Every episode's index record as a dict (read on first use)."""
        if self._index is None:
            self._index = [json.loads(line) for line in (self.path / INDEX).read_text().splitlines() if line]
        return self._index

    def ids(self) -> list[str]:
        return list(self.table.ids)  # a copy: callers filter it

    def frame_counts(self) -> np.ndarray:
        return self.table.frames

    def head(self, n: int) -> list[dict[str, Any]]:
        """The first `n` index records, without reading the rest."""
        out = []
        with open(self.path / INDEX) as f:
            for line in f:
                if len(out) >= n:
                    break
                if line.strip():
                    out.append(json.loads(line))
        return out

    def _row(self, episode_id: str) -> int | None:
        if self._rows is None:
            self._rows = {eid: i for i, eid in enumerate(self.ids())}
            self._shard_of = self.table.shards
        return self._rows.get(episode_id)

    def instructions(self, episode_id: str) -> list[str]:
        row = self._row(episode_id)
        if row is None:
            raise KeyError(f"tier '{self.name}' has no episode '{episode_id}'")
        return self.table.instructions(row)

    @property
    def name(self) -> str:
        return self.manifest.tier

    @property
    def content_hash(self) -> str:
        return self.manifest.content_hash

    def __len__(self) -> int:
        return self.manifest.episodes

    def _shard_members(self, shard: int) -> dict[str, tuple[int, int]]:
        """member name -> (offset of its data, size), read once per shard."""
        if shard not in self._members:
            self._members[shard] = shard_members(self.path / self.manifest.shards[shard]["name"])
        return self._members[shard]

    def _read(self, shard: int, name: str) -> bytes:
        offset, size = self._shard_members(shard)[name]
        with open(self.path / self.manifest.shards[shard]["name"], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def read_episode(self, episode_id: str, views: list[str] | None = None, prefer: str | None = None) -> Episode:
        """The episode with `views` decoded (None: every view; with `prefer`: only that view where the episode
        has it, else only its first, so a reader wanting one camera never decodes the others)."""
        row = self._row(episode_id)
        if row is None:
            raise KeyError(f"tier '{self.name}' has no episode '{episode_id}'")
        shard = int(self._shard_of[row])
        members = self._shard_members(shard)
        meta = json.loads(self._read(shard, f"{episode_id}.meta.json"))
        frames = {}
        order = meta.get("view_order") or list(meta["views"])
        if views is None and prefer is not None:
            views = [prefer] if prefer in order else order[:1]
        for view in views or order:
            # the codecs' names first (a dict lookup), then a scan: a shard of small episodes has 10^5 members
            name = next((f"{episode_id}.{view}.{ext}" for ext in ("mp4", "npz") if f"{episode_id}.{view}.{ext}" in members),
                        None) or next((n for n in members if n.startswith(f"{episode_id}.{view}.")
                                       and not n.endswith((".npy", ".json"))), None)
            if name is None:
                raise TierError(f"{self.path}: episode '{episode_id}' has no view '{view}' (has {order})")
            frames[view] = decode_frames(self._read(shard, name), name.rsplit(".", 1)[1])
        load = lambda key: (np.load(io.BytesIO(self._read(shard, f"{episode_id}.{key}.npy")))  # noqa: E731
                            if f"{episode_id}.{key}.npy" in members else None)
        return Episode(episode_id=episode_id, frames=frames, actions=load("actions"), state=load("state"),
                       instructions=meta["instructions"], fps=meta["fps"], embodiment=meta["embodiment"],
                       source=meta["source"], extra=meta.get("extra", {}))

    def read_arrays(self, episode_id: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Actions and state only (no video decode): what statistics and probes need."""
        row = self._row(episode_id)
        if row is None:
            raise KeyError(f"tier '{self.name}' has no episode '{episode_id}'")
        shard = int(self._shard_of[row])
        members = self._shard_members(shard)
        out = []
        for key in ("actions", "state"):
            name = f"{episode_id}.{key}.npy"
            out.append(np.load(io.BytesIO(self._read(shard, name))) if name in members else None)
        return out[0], out[1]

    def episodes(self) -> Iterator[Episode]:
        for episode_id in self.ids():
            yield self.read_episode(episode_id)

    def quarantined(self) -> list[dict[str, Any]]:
        p = self.path / QUARANTINE
        return [json.loads(line) for line in p.read_text().splitlines() if line] if p.exists() else []

    def verify(self) -> list[str]:
        """Shards whose bytes no longer match the manifest (empty = intact)."""
        bad = []
        for s in self.manifest.shards:
            p = self.path / s["name"]
            if not p.exists():
                bad.append(f"{p}: missing")
            elif sha256_file(p) != s["sha256"]:
                bad.append(f"{p}: sha256 differs from the manifest")
        return bad


def folder_hash(folder: Path, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 over `<relative path>\t<sha256>` of every file, sorted: the identity of a folder's content (an
    export, a model). The registry's export hash and a latent-action feature's model hash are this. `exclude`:
    top-level file names left out (what a registry adds around the content)."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not (p.parent == folder and p.name in exclude):
            h.update(f"{p.relative_to(folder)}\t{sha256_file(p)}\n".encode())
    return h.hexdigest()


def export_hash(folder: Path) -> str:
    """The identity of a model export's content: its `folder_hash`, without what a registry writes around it
    (`contracts.PACKAGING_FILES`: MLflow's model files). What the registry tags a version with and checks a
    download against, and what a policy server reports it serves."""
    from ..contracts import PACKAGING_FILES

    return folder_hash(folder, PACKAGING_FILES)
