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
        self.reservoir: np.ndarray | None = None
        self.cap, self.seen = reservoir, 0
        self.rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        if len(x) == 0:
            return
        if self.mean is None:
            d = x.shape[1]
            self.mean, self.m2 = np.zeros(d), np.zeros(d)
            self.min, self.max = np.full(d, np.inf), np.full(d, -np.inf)
            self.reservoir = np.empty((0, d))
        n_b, mean_b = len(x), x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        delta, total = mean_b - self.mean, self.n + n_b
        self.mean = self.mean + delta * n_b / total
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / total
        self.n = total
        self.min, self.max = np.minimum(self.min, x.min(0)), np.maximum(self.max, x.max(0))
        # reservoir sampling keeps the quantiles honest without holding every row
        free = self.cap - len(self.reservoir)
        if free > 0:
            self.reservoir = np.vstack([self.reservoir, x[:free]])
            self.seen += min(free, len(x))
            x = x[free:]
        for row in x:
            self.seen += 1
            j = self.rng.integers(0, self.seen)
            if j < self.cap:
                self.reservoir[j] = row

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


class TierWriter:
    """Append episodes; `close()` writes the manifest and moves the finished tier into place atomically."""

    def __init__(self, out_dir: str | Path, spec: TierSpec):
        self.out = Path(out_dir)
        self.spec = spec
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self.tmp / SHARD_DIR).mkdir()
        self._tar: tarfile.TarFile | None = None
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
        self._tar = tarfile.open(self._shard_path(self._shard_idx), "w", format=tarfile.USTAR_FORMAT)
        self._shard_bytes = 0
        self.shards.append({"name": f"{SHARD_DIR}/shard-{self._shard_idx:06d}.tar", "episodes": 0})

    def _finish_shard(self) -> None:
        if self._tar is not None:
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
        self._ids.add(ep.episode_id)
        members: list[tuple[str, bytes]] = []
        fps = float(self.spec.fps or ep.fps)
        for view in ep.frames:  # the source's camera order: its first camera is the view a window takes by default
            data, ext = encode_frames(ep.frames[view], self.spec.codec, fps)
            members.append((f"{ep.episode_id}.{view}.{ext}", data))
            self.views.setdefault(view, list(ep.frames[view].shape[1:3]))
        native = ep.action_dim
        if ep.actions is not None:
            actions = ep.actions.astype(np.float32)
            if self.spec.action_dim and native < self.spec.action_dim:
                actions = np.pad(actions, ((0, 0), (0, self.spec.action_dim - native)))
            members.append((f"{ep.episode_id}.actions.npy", _npy(actions)))
            self.action_stats.update(actions)
        if ep.state is not None:
            state = ep.state.astype(np.float32)
            if self.spec.action_dim and self.spec.pad_state and state.shape[1] < self.spec.action_dim:
                state = np.pad(state, ((0, 0), (0, self.spec.action_dim - state.shape[1])))
            if self.state_dim is not None and state.shape[1] != self.state_dim:
                raise ValueError(f"episode '{ep.episode_id}': state is {state.shape[1]}-d, "
                                 f"tier '{self.spec.name}' stores {self.state_dim}-d state")
            members.append((f"{ep.episode_id}.state.npy", _npy(state)))
            self.state_stats.update(state)
            self.state_dim = int(state.shape[1])
        meta = ep.metadata()
        meta["native_action_dim"] = native
        meta["view_order"] = list(ep.frames)  # `views` is a mapping the sorted-key JSON reorders; older shards lack it
        members.append((f"{ep.episode_id}.meta.json", json.dumps(meta, sort_keys=True).encode()))

        size = sum(len(d) for _, d in members)
        if self._tar is None or (self._shard_bytes and self._shard_bytes + size > self.spec.shard_bytes):
            self._roll()
        for name, data in members:
            _add(self._tar, name, data)
        self._shard_bytes += size
        self.shards[-1]["episodes"] += 1
        t = ep.num_frames
        self.frames += t
        self.fps_values.add(fps)
        emb = self.embodiments.setdefault(ep.embodiment, {"episodes": 0, "frames": 0, "action_dim": native})
        emb["episodes"] += 1
        emb["frames"] += t
        self.index.append({"id": ep.episode_id, "shard": self._shard_idx, "frames": t, "embodiment": ep.embodiment,
                           "native_action_dim": native, "instructions": list(ep.instructions)})

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


class Tier:
    """Read access to a finished tier: the manifest, the episode index, and episodes by id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = TierManifest.read(self.path)
        except ContractError as e:
            raise TierError(str(e)) from None
        self.index = [json.loads(line) for line in (self.path / INDEX).read_text().splitlines() if line]
        self._by_id = {r["id"]: r for r in self.index}
        self._members: dict[int, dict[str, tarfile.TarInfo]] = {}

    @property
    def name(self) -> str:
        return self.manifest.tier

    @property
    def content_hash(self) -> str:
        return self.manifest.content_hash

    def __len__(self) -> int:
        return len(self.index)

    def _shard_members(self, shard: int) -> dict[str, tarfile.TarInfo]:
        if shard not in self._members:
            p = self.path / self.manifest.shards[shard]["name"]
            with tarfile.open(p) as tar:
                self._members[shard] = {m.name: m for m in tar.getmembers()}
        return self._members[shard]

    def _read(self, shard: int, name: str) -> bytes:
        info = self._shard_members(shard)[name]
        with open(self.path / self.manifest.shards[shard]["name"], "rb") as f:
            f.seek(info.offset_data)
            return f.read(info.size)

    def read_episode(self, episode_id: str, views: list[str] | None = None, prefer: str | None = None) -> Episode:
        """The episode with `views` decoded (None: every view; with `prefer`: only that view where the episode
        has it, else only its first, so a reader wanting one camera never decodes the others)."""
        rec = self._by_id.get(episode_id)
        if rec is None:
            raise KeyError(f"tier '{self.name}' has no episode '{episode_id}'")
        shard = rec["shard"]
        members = self._shard_members(shard)
        meta = json.loads(self._read(shard, f"{episode_id}.meta.json"))
        frames = {}
        order = meta.get("view_order") or list(meta["views"])
        if views is None and prefer is not None:
            views = [prefer] if prefer in order else order[:1]
        for view in views or order:
            name = next((n for n in members if n.startswith(f"{episode_id}.{view}.") and not n.endswith((".npy", ".json"))), None)
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
        rec = self._by_id[episode_id]
        members = self._shard_members(rec["shard"])
        out = []
        for key in ("actions", "state"):
            name = f"{episode_id}.{key}.npy"
            out.append(np.load(io.BytesIO(self._read(rec["shard"], name))) if name in members else None)
        return out[0], out[1]

    def episodes(self) -> Iterator[Episode]:
        for rec in self.index:
            yield self.read_episode(rec["id"])

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


def folder_hash(folder: Path) -> str:
    """sha256 over `<relative path>\t<sha256>` of every file, sorted: the identity of a folder's content (an
    export, a model). The registry's export hash and a latent-action feature's model hash are this."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(folder)}\t{sha256_file(p)}\n".encode())
    return h.hexdigest()
