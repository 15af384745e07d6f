"""Atomic, resumable, content-hashed training checkpoints around a DeepSpeed engine.

A run directory holds one linear history of checkpoints::

    checkpoints/
        step-000010/                  a COMPLETE checkpoint (only complete ones carry this name)
            ds/...                    DeepSpeed's own files (module, optimizer partitions, lr scheduler,
                                      client state), written by ``engine.save_checkpoint(<dir>, tag="ds")``
            latest, zero_to_fp32.py   also DeepSpeed's: they make ``python step-000010/zero_to_fp32.py
                                      step-000010 out/`` work on a checkpoint as it lies
            rng-rank{r}.pt            torch / CUDA / numpy / python RNG states of rank r
            manifest.json             written last, before the rename
        .tmp-step-000020-<nonce>/     being written (never picked; removed by the next successful save)
        latest                        text "step-000010"; moved last (latest.tmp + os.replace)

The commit point is the rename ``.tmp-step-N-<nonce>`` -> ``step-N``: a directory named ``step-N`` always
holds a manifest, and a manifest lists every file with its size (and sha256, see ``hash_files``).
``latest`` is a hint for people and outside tools; `find_latest_complete` trusts the scan, warns when the
pointer disagrees, and never returns a directory whose files do not match its manifest.

How a save runs (`CheckpointSaver`; `save_checkpoint` is its synchronous form): at the step boundary DeepSpeed's
``save_checkpoint`` runs with its checkpoint engine swapped for a capture (`_Capture`) that keeps a host copy of each
state dict it would write (one copy per storage, into the previous save's buffers when they fit), so ``ds/`` holds
exactly DeepSpeed's own files and layout. Then, on a background thread when asynchronous, every rank writes its
files with torch.save, several files at once, hashing each byte on its way to the disk (sha256 in the same pass, no
read-back), flushing while it writes and fsyncing each file and folder before rank 0 commits by the rename. The
ranks' background threads agree over a process group of their own (gloo), never the training loop's. At most one
save is in flight: the next one waits for it (a warning gives the seconds); its error is raised at the next step
boundary (`CheckpointSaver.check`), when the next save starts, or at `wait` (end of training, before the export).
``hash_files=False`` records sizes only (``sha256: null`` per file, ``content_hash: null``; lineage then has no
content hash for that checkpoint). ``fsync=True`` (the default) flushes every file and folder before the rename so
a crash of the machine, not only of the process, cannot leave a ``step-N`` with torn files. A load reads DeepSpeed's
files memory-mapped (`_MappedReader`): DeepSpeed copies the tensors into its partitions once, not twice.

One job writes to a run directory at a time. Saving step N while complete checkpoints with a step above N
exist (a job was restarted from an older checkpoint by hand) moves those aside as
``superseded-step-M-<nonce>`` (kept, never picked, named in a warning), so the history stays linear.

Every function that takes an ``engine`` is collective: all ranks call it, in the same order. The engine is
used only through ``save_checkpoint`` / ``load_checkpoint`` and its ``checkpoint_engine`` hook (plus
``lr_scheduler``, ``get_lr`` and ``zero_optimization_stage`` when present; an engine without the hook writes its
files itself, synchronously); nothing here depends on DeepSpeed's file layout inside ``ds/``,
so the ZeRO stage does not matter (ZeRO-2 and ZeRO-3 are tested). Needs a filesystem that every rank sees
at the same path.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

DS_TAG = "ds"
MANIFEST = "manifest.json"
LATEST = "latest"
SCHEMA_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
_HASH_CHUNK = 8 << 20


class CheckpointError(Exception):
    """A checkpoint could not be written, found, verified or loaded; the message names the path."""


@dataclass
class CheckpointManifest:
    stage: str
    step: int
    data_position: int  # samples consumed by the data stream (all ranks together)
    lr_schedule: dict[str, Any] | None  # {"last_lr": [...], "step": int, "state_dict": {...}}
    rng_files: list[str]  # relative to the checkpoint dir, index = rank
    config_hash: str
    parent: str | None  # what this job started from: a model export path/URI or a previous checkpoint
    world_size: int
    zero_stage: int | None
    wall_seconds: float  # cumulative training wall time across resumes
    created_at: str  # UTC ISO 8601
    motus_version: str
    files: dict[str, dict[str, Any]]  # relative path -> {"bytes": int, "sha256": str | None}
    content_hash: str | None  # sha256 over the sorted file entries; None when files were not hashed
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointManifest:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise ValueError(f"manifest lacks {missing}")
        unknown = sorted(data.keys() - names)
        if unknown:
            log.warning("manifest has fields this version does not know, ignored: %s", unknown)
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, ckpt_dir: str | Path) -> CheckpointManifest:
        """Parse ``<ckpt_dir>/manifest.json``; CheckpointError naming the file on any problem."""
        path = Path(ckpt_dir) / MANIFEST
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return cls.from_dict(data)
        except FileNotFoundError:
            raise CheckpointError(f"no manifest at {path}") from None
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"unreadable manifest {path}: {e}") from e


def content_hash(files: dict[str, dict[str, Any]]) -> str | None:
    """sha256 over ``"<path>\\t<bytes>\\t<sha256>\\n"`` for each file, sorted by path; None if any is unhashed."""
    h = hashlib.sha256()
    for rel in sorted(files):
        entry = files[rel]
        if entry.get("sha256") is None:
            return None
        h.update(f"{rel}\t{entry['bytes']}\t{entry['sha256']}\n".encode())
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# --- save -------------------------------------------------------------------------------------------------
def save_checkpoint(
    engine: Any,
    root: str | Path,
    step: int,
    *,
    stage: str,
    data_position: int,
    config_hash: str,
    parent: str | None,
    wall_seconds: float,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = 3,
    hash_files: bool = True,
    fsync: bool = True,
) -> Path:
    """Write ``root/step-%06d`` atomically and point ``root/latest`` at it; returns once it is committed.
    Collective; same path on every rank. `CheckpointSaver` (background=True) is the asynchronous form.

    keep_last: complete checkpoints to keep after this one is written (>= 1; the newest is never pruned),
    or None to keep all. Leftover ``.tmp-*`` dirs of crashed saves are removed at the same time.
    """
    return CheckpointSaver(background=False).save(
        engine, root, step, stage=stage, data_position=data_position, config_hash=config_hash, parent=parent,
        wall_seconds=wall_seconds, extra=extra, keep_last=keep_last, hash_files=hash_files, fsync=fsync)


@dataclass
class SaveTiming:
    """What one save cost: `blocked_s` the caller (the training loop) waited inside `save`, of which `waited_s` for
    the previous save still in flight; `write_s` the write itself (files, hashes, fsyncs, manifest, rename)."""

    step: int
    blocked_s: float
    waited_s: float
    write_s: float | None = None  # None until the write ends


class CheckpointSaver:
    """Saves checkpoints, in the background when `background` (at most one in flight).

    A save snapshots the engine's state into host memory at the step boundary (DeepSpeed's own state dicts, taken
    through its checkpoint-engine hook, every tensor copied: training may change the live ones the moment `save`
    returns), then writes, hashes and fsyncs the files (one pass over the bytes, several files at once) and
    commits by the rename, on a background thread. Until the rename, the checkpoint is a ``.tmp-*`` folder that
    nothing picks: a crash mid-write leaves the previous checkpoint as the latest.

    `save` first waits for a save still in flight (a warning says how long) and raises its error; `check` raises
    the error of a background save that has failed (call it at each step boundary); `wait` waits for the one in
    flight and returns its path. All three are collective (every rank calls them in the same order); the
    background writes of the ranks agree through their own process group, so they never interleave with the
    training's collectives.
    """

    def __init__(self, *, background: bool = True, writers: int = 4, keep_buffers: bool = True):
        self.background = background
        self.writers = max(1, writers)
        # the last snapshot's host buffers, reused by the next one: copying into memory that is already mapped is
        # several times faster than into fresh pages, and the copy is what the training loop waits for. Costs one
        # checkpoint's worth of host memory per rank between saves.
        self.keep_buffers = keep_buffers
        self._pool: dict[int, list[Any]] = {}
        self.timings: list[SaveTiming] = []
        self._thread: threading.Thread | None = None
        self._outcome: tuple[str, Any] | None = None  # ("ok", path) | ("err", exception) of the last save
        self._final: Path | None = None
        self._abandoned = threading.Event()
        self._group: Any = None

    # -- the caller's side ---------------------------------------------------------------------------------------
    def save(self, engine: Any, root: str | Path, step: int, *, stage: str, data_position: int, config_hash: str,
             parent: str | None, wall_seconds: float, extra: dict[str, Any] | None = None,
             keep_last: int | None = 3, hash_files: bool = True, fsync: bool = True) -> Path:
        """Snapshot now, write (in the background when `background`); returns the ``step-N`` path the save commits
        to (it exists once `wait` returns, or at once when not `background`)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        t0 = time.perf_counter()
        busy = self._thread is not None and self._thread.is_alive()
        self.wait()
        waited = time.perf_counter() - t0
        if busy:
            log.warning("checkpoint step %d waited %.1f s for the previous save to finish (saves take longer than "
                        "checkpoint_every steps)", step, waited)
        root = Path(root)
        rank, world = _rank(), _world_size()
        final = root / step_dir_name(step)
        group = self._collective_group()

        # 1. rank 0 names the tmp dir; everyone writes into it
        def make_tmp() -> str:
            root.mkdir(parents=True, exist_ok=True)
            name = f".tmp-{step_dir_name(step)}-{secrets.token_hex(4)}"
            (root / name).mkdir()
            return name

        tmp = root / _on_rank0(make_tmp, f"creating a checkpoint dir under {root}")
        timing = SaveTiming(step, 0.0, waited)
        self.timings.append(timing)
        try:
            # 2. the snapshot: host copies of everything the files will hold, and the manifest's engine facts
            pool, self._pool = self._pool, {}
            snap = _snapshot(engine, tmp, step, stage, data_position, config_hash, rank, pool)
        except Exception as e:
            raise self._failed(root, tmp, final, e, need=0, background=False) from None
        meta = dict(stage=stage, step=step, data_position=int(data_position), config_hash=config_hash,
                    parent=parent, wall_seconds=float(wall_seconds), extra=_jsonable(extra or {}),
                    lr_schedule=_lr_schedule(engine), zero_stage=_zero_stage(engine))

        def job() -> Path:
            t = time.perf_counter()
            try:
                return self._write_and_commit(snap, meta, root, tmp, final, keep_last, hash_files, fsync, rank,
                                              world, group)
            except Exception as e:
                raise self._failed(root, tmp, final, e, need=snap.nbytes * world,
                                   background=self.background) from None
            finally:
                timing.write_s = time.perf_counter() - t
                if self.keep_buffers:  # the files are written (or failed): the buffers can take the next snapshot
                    for storage in snap.storages:
                        self._pool.setdefault(storage.nbytes(), []).append(storage)
                snap.files.clear()

        self._final, self._outcome = final, None
        if not self.background:
            try:
                return job()
            finally:
                timing.blocked_s = time.perf_counter() - t0

        def run() -> None:
            try:
                self._outcome = ("ok", job())
            except BaseException as e:  # noqa: BLE001 - handed to the training loop by check / wait / save
                self._outcome = ("err", e)

        self._abandoned.clear()
        self._thread = threading.Thread(target=run, name=f"motus-checkpoint-{step}", daemon=True)
        self._thread.start()
        timing.blocked_s = time.perf_counter() - t0
        return final

    def check(self) -> None:
        """Raise the error of a background save that has ended with one (at a step boundary: never lost)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> Path | None:
        """Wait for the save in flight; its committed path (None when there was none), or its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        outcome, self._outcome = self._outcome, None
        if outcome is None:
            return None
        kind, value = outcome
        if kind == "err":
            raise value
        return value

    def in_flight(self) -> Path | None:
        return self._final if self._thread is not None and self._thread.is_alive() else None

    def abandon(self) -> None:
        """The job is failing: a save still writing must not commit after it (its .tmp- folder is removed by the
        next job that takes the run folder)."""
        self._abandoned.set()
        if self.in_flight() is not None:
            log.warning("the save of %s was still writing when the job failed: abandoned", self._final)

    # -- internals -------------------------------------------------------------------------------------------------
    def _collective_group(self) -> Any:
        """The background writes' own process group (gloo: host objects only). Created at the first save, when every
        rank is here; a background thread then never shares a communicator with the training loop."""
        if not (self.background and _dist()):
            return None
        if self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")
        return self._group

    def _failed(self, root: Path, tmp: Path, final: Path, error: BaseException, *, need: int,
                background: bool) -> BaseException:
        why = _out_of_space(root, tmp, error, need)
        if why is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # a rerun must find room again, not a dead partial save
            return CheckpointError(why)
        if background:
            return CheckpointError(f"the background save of checkpoint {final} failed ({tmp.name} is left for the "
                                   f"next job to remove): {type(error).__name__}: {error}")
        return error

    def _write_and_commit(self, snap: _Snapshot, meta: dict[str, Any], root: Path, tmp: Path, final: Path,
                          keep_last: int | None, hash_files: bool, fsync: bool, rank: int, world: int,
                          group: Any) -> Path:
        # 3. every rank writes its own files from the snapshot, hashing the bytes on their way to the disk, several
        #    files at once (a rank with one big file still overlaps its hashing and writing, see _HashingFile)
        mine: dict[str, dict[str, Any]] = {}

        def write_share() -> None:
            items = list(snap.files.items())
            with ThreadPoolExecutor(max_workers=min(self.writers, max(1, len(items))),
                                    thread_name_prefix="motus-ckpt-write") as pool:
                described = pool.map(lambda kv: (kv[0], _write_captured(tmp / kv[0], kv[1], snap.zipfile,
                                                                       hash_files=hash_files, fsync=fsync)), items)
                mine.update(described)

        _collective_check(write_share, f"writing {tmp}", group)
        shares = _gather(mine, group)

        # 4. rank 0 commits: the small files DeepSpeed wrote itself (scripts, its `latest`), manifest, rename, latest
        def commit() -> None:
            files = {k: v for share in shares for k, v in share.items()}
            for rel in _list_files(tmp):
                if rel not in files:
                    files[rel] = _describe(tmp / rel, hash_files=hash_files, fsync=fsync)
            manifest = CheckpointManifest(
                stage=meta["stage"], step=meta["step"], data_position=meta["data_position"],
                lr_schedule=meta["lr_schedule"], rng_files=[_rng_name(r) for r in range(world)],
                config_hash=meta["config_hash"], parent=meta["parent"], world_size=world,
                zero_stage=meta["zero_stage"], wall_seconds=meta["wall_seconds"],
                created_at=datetime.now(timezone.utc).isoformat(), motus_version=_motus_version(), files=files,
                content_hash=content_hash(files), extra=meta["extra"],
            )
            _write_text(tmp / MANIFEST, manifest.to_json(), fsync=fsync)
            if fsync:
                _fsync_dir(tmp)
                for d in sorted({(tmp / rel).parent for rel in files} - {tmp}):
                    _fsync_dir(d)  # the entries of files in sub-folders (ds/) are as durable as the files
            if self._abandoned.is_set():
                raise CheckpointError(f"the job failed while {final} was being written: not committed")
            _supersede_newer(root, meta["step"])
            _replace_dir(tmp, final)
            if fsync:
                _fsync_dir(root)
            _write_text(root / (LATEST + ".tmp"), final.name + "\n", fsync=fsync)
            os.replace(root / (LATEST + ".tmp"), root / LATEST)
            if fsync:
                _fsync_dir(root)

        _on_rank0(commit, f"committing {tmp} -> {final}", group)

        # 5. prune (rank 0, best effort: a failed prune never fails the save)
        if rank == 0:
            try:
                _prune(root, keep_last, keep=final)
            except OSError as e:
                log.warning("pruning old checkpoints under %s failed: %s", root, e)
        log.info("saved checkpoint %s (stage=%s step=%d data_position=%d)", final, meta["stage"], meta["step"],
                 meta["data_position"])
        return final


def _out_of_space(root: Path, tmp: Path, error: BaseException, need_fallback: int) -> str | None:
    """The message for a save that failed because the disk is full (ENOSPC anywhere in the error's chain, or less
    room left than a checkpoint takes: torch and DeepSpeed report a full disk as `iostream error` / `file write
    failed`), or None for any other failure. `need_fallback`: the bytes a first checkpoint takes (its snapshot)."""
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    enospc = any(getattr(x, "errno", None) == errno.ENOSPC or "No space left" in str(x) for x in chain)
    previous = [d for _, d in list_step_dirs(root)]
    if previous:
        need = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file())
    else:
        need = need_fallback
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = 0
    if not enospc and free >= need:
        return None
    mb = lambda n: f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"  # noqa: E731
    return (f"no space left on {root} (a checkpoint needs ~{mb(need)}, {mb(free)} free): the partial save "
            f"{tmp.name} was removed; free space there or give the job another run folder")


# --- internals: the snapshot ------------------------------------------------------------------------------
@dataclass
class _Snapshot:
    files: dict[str, Any]  # path relative to the checkpoint dir -> the object torch.save writes there (host copies)
    zipfile: bool  # DeepSpeed's serialization setting, kept so the files are what its own save would write
    nbytes: int  # host bytes the copies take (a first checkpoint's size, for the out-of-space message)
    storages: list[Any] = field(default_factory=list)  # the host buffers behind the copies


class _Capture:
    """Stands in for DeepSpeed's checkpoint engine during ``engine.save_checkpoint``: every state dict DeepSpeed
    would write is kept as a host copy under its relative path instead. DeepSpeed still decides what goes in which
    file (ZeRO partitions, module states, client state), so the folder is the one its own save writes and its
    ``load_checkpoint`` and ``zero_to_fp32.py`` read it unchanged. Directories and the small files DeepSpeed writes
    without the checkpoint engine (the recovery scripts, its ``latest``) land in the tmp dir as before."""

    def __init__(self, real: Any, tmp: Path, pool: dict[int, list[Any]]):
        self.real, self.tmp = real, tmp
        self.files: dict[str, Any] = {}
        # storage -> (the storage, its copy): views stay views of one copy. Holding the source until the capture
        # ends keeps its address from being reused by a later temporary (DeepSpeed clones some states per file),
        # which would otherwise find the earlier copy under the same key
        self.memo: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self.pool = pool  # nbytes -> free host buffers of a previous snapshot
        self.zipfile = bool(getattr(real, "zipfile_serialization", True))

    def create(self, info: Any) -> None:
        pass

    def commit(self, info: Any) -> bool:
        return True

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        rel = Path(path).resolve().relative_to(self.tmp.resolve()).as_posix()
        self.files[rel] = _host_copy(state_dict, self.memo, self.pool)

    def load(self, path: str, map_location: Any = None) -> Any:
        return self.real.load(path, map_location=map_location)

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        fn = getattr(self.real, "is_data_parallel_writer", None)
        return fn(dp_rank) if callable(fn) else dp_rank == 0

    def is_decoupled(self) -> bool:
        return False  # the writes are ours now; nothing to commit later on DeepSpeed's side

    def preserves_storage_sharing(self) -> bool:
        fn = getattr(self.real, "preserves_storage_sharing", None)
        return fn() if callable(fn) else True

    def set_commit_info(self, info: Any) -> None:
        pass

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        pass


class _MappedReader:
    """DeepSpeed's checkpoint engine for a load, reading each file memory-mapped: DeepSpeed copies the tensors into
    its own partitions anyway, so reading them first into fresh host memory would be a second copy."""

    def __init__(self, real: Any):
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        except RuntimeError:  # a legacy (non-zip) torch.save file cannot be mapped
            return self.real.load(path, map_location=map_location)


def _snapshot(engine: Any, tmp: Path, step: int, stage: str, data_position: int, config_hash: str,
              rank: int, pool: dict[int, list[Any]]) -> _Snapshot:
    client_state = {"motus": {"step": step, "stage": stage, "data_position": data_position,
                              "config_hash": config_hash}}
    real = getattr(engine, "checkpoint_engine", None)
    if real is None:  # not a DeepSpeed engine (nothing to hook): it writes its files itself, now
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client_state)
        files: dict[str, Any] = {}
        zipfile, nbytes = True, 0
    else:
        capture = _Capture(real, tmp, pool)
        engine.checkpoint_engine = capture
        try:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client_state)
        finally:
            engine.checkpoint_engine = real
        files, zipfile = capture.files, capture.zipfile
        nbytes = sum(c.nbytes() for _, c in capture.memo.values())
    files[_rng_name(rank)] = _rng_state()
    storages = [c for _, c in capture.memo.values()] if real is not None else []
    return _Snapshot(files, zipfile, nbytes, storages)


def _host_copy(x: Any, memo: dict[tuple[Any, ...], Any], pool: dict[int, list[Any]]) -> Any:
    """`x` with every tensor copied to host memory, containers rebuilt, other leaves shared (DeepSpeed's config
    and version objects, numbers, strings: not changed by training). A storage is copied once and the tensors
    on it become views of the copy, so torch.save writes exactly what it would have written from the originals."""
    if isinstance(x, torch.Tensor):
        return _tensor_copy(x, memo, pool)
    if isinstance(x, dict):
        out = copy.copy(x)  # keeps the type and attributes (a module state dict's `_metadata`)
        for k, v in x.items():
            out[k] = _host_copy(v, memo, pool)
        return out
    if isinstance(x, list):
        return [_host_copy(v, memo, pool) for v in x]
    if isinstance(x, tuple):
        items = [_host_copy(v, memo, pool) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def _tensor_copy(t: torch.Tensor, memo: dict[tuple[Any, ...], Any], pool: dict[int, list[Any]]) -> torch.Tensor:
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        return t.detach().to("cpu", copy=True)
    src = t.untyped_storage()
    key = (src.data_ptr(), src.device, src.nbytes())
    storage = memo[key][1] if key in memo else None
    if storage is None:
        free = pool.get(src.nbytes())
        if free:
            storage = free.pop()
            storage.copy_(src)
        elif src.device.type == "cpu":
            storage = src.clone()
        else:  # pinned: the copy from the device runs at the bus's speed, and the buffer is reused next time
            storage = torch.empty(src.nbytes(), dtype=torch.uint8, pin_memory=True).untyped_storage()
            storage.copy_(src)
        memo[key] = (src, storage)
    out = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    if t.requires_grad:
        out.requires_grad_(True)
    return out


class _HashingFile:
    """A write-only file for torch.save that hashes every byte on its way to the disk: no read-back. A large write
    is hashed on a helper thread while it is written (both release the GIL), so hashing hides behind the disk."""

    _OVERLAP = 1 << 20
    _FLUSH_EVERY = 64 << 20

    def __init__(self, raw: Any, *, hash_files: bool, fsync: bool = False):
        self.raw = raw
        self.h = hashlib.sha256() if hash_files else None
        self.n = 0
        self._helper: ThreadPoolExecutor | None = None
        # fsync: the dirty pages go to the disk while later bytes are still being serialized and hashed (one
        # fdatasync at a time on its own thread), so the final fsync has only the tail left to flush
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="motus-ckpt-flush") if fsync else None
        self._flushing: Any = None
        self._unflushed = 0

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        self.n += mv.nbytes
        if self.h is None:
            self.raw.write(mv)
        elif mv.nbytes >= self._OVERLAP:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="motus-ckpt-hash")
            hashed = self._helper.submit(self.h.update, mv)
            self.raw.write(mv)
            hashed.result()
        else:
            self.h.update(mv)
            self.raw.write(mv)
        self._unflushed += mv.nbytes
        if self._flusher is not None and self._unflushed >= self._FLUSH_EVERY and (
                self._flushing is None or self._flushing.done()):
            self.raw.flush()
            self._unflushed = 0
            self._flushing = self._flusher.submit(os.fdatasync, self.raw.fileno())
        return mv.nbytes

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown()
        if self._flusher is not None:
            self._flusher.shutdown()  # waits for a flush in flight: the file is closed after it
            if self._flushing is not None:
                self._flushing.result()


def _write_captured(path: Path, obj: Any, zipfile: bool, *, hash_files: bool, fsync: bool) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw:
        f = _HashingFile(raw, hash_files=hash_files, fsync=fsync)
        try:
            torch.save(obj, f, _use_new_zipfile_serialization=zipfile)
        finally:
            f.close()
        raw.flush()
        if fsync:
            os.fsync(raw.fileno())
    return {"bytes": f.n, "sha256": f.h.hexdigest() if f.h is not None else None}


# --- find / verify ----------------------------------------------------------------------------------------
def list_step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every ``step-*`` dir under root, by step, without checking them."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest_complete(root: str | Path) -> Path | None:
    """The highest-step ``step-*`` dir whose manifest parses and whose files are present with their sizes.

    ``.tmp-*`` dirs are never considered; broken ``step-*`` dirs are skipped with a warning naming them.
    The ``latest`` pointer is cross-checked: a warning when it names a missing/broken dir or not the one found.
    Sizes only (cheap); use `verify_checkpoint` for the sha256 check.
    """
    root = Path(root)
    found = None
    for step, d in reversed(list_step_dirs(root)):
        problems = _check(d, check_hashes=False, expect_step=step)
        if problems:
            log.warning("skipping checkpoint %s: %s", d, "; ".join(problems))
            continue
        found = d
        break

    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = root / name
        if found is None or target != found:
            why = ("missing" if not target.is_dir() else
                   "; ".join(_check(target, check_hashes=False)) or "not the newest complete one")
            log.warning("%s points to %s (%s); using the scan's result: %s", pointer, name, why, found)
    elif found is not None:
        log.warning("%s is missing; using the scan's result: %s", pointer, found)
    return found


def verify_checkpoint(ckpt_dir: str | Path, *, check_hashes: bool = True) -> list[str]:
    """Problems with a checkpoint dir (empty list = good): manifest, missing/extra/resized files, and
    (check_hashes, when the manifest has them) every file's sha256 and the content hash. Reads every byte."""
    return _check(Path(ckpt_dir), check_hashes=check_hashes, check_extra=True)


# --- load -------------------------------------------------------------------------------------------------
def load_checkpoint(
    engine: Any,
    ckpt_dir: str | Path,
    *,
    allow_world_size_change: bool = False,
    verify_hashes: bool = False,
) -> CheckpointManifest:
    """Restore module, optimizer, lr scheduler (via DeepSpeed) and this rank's RNG states. Collective.

    Before touching the engine: the manifest must parse and every file must be present with its recorded
    size (verify_hashes: and its sha256 -- rank 0 reads every byte); rank 0 decides and broadcasts, so a
    bad checkpoint raises CheckpointError on every rank instead of hanging some inside DeepSpeed. A different world size than the
    checkpoint's raises unless allow_world_size_change; then DeepSpeed reshards what it can, rank r restores
    ``rng-rank{r}.pt`` when the checkpoint has one and keeps its own RNG (warning) otherwise.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, world = _rank(), _world_size()

    def precheck() -> dict[str, Any]:
        # decided on rank 0 and broadcast: a rank that raised alone would leave the others hanging in DeepSpeed
        if not ckpt_dir.is_dir():
            raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
        manifest = CheckpointManifest.read(ckpt_dir)
        problems = _check(ckpt_dir, check_hashes=verify_hashes)
        if problems:
            raise CheckpointError(f"checkpoint {ckpt_dir} is broken: " + "; ".join(problems))
        if manifest.world_size != world and not allow_world_size_change:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} was written by {manifest.world_size} ranks, this job has {world}; "
                "pass allow_world_size_change=True to load it anyway (RNG streams and data order will "
                "differ from an uninterrupted run)")
        return dataclasses.asdict(manifest)

    manifest = CheckpointManifest.from_dict(_on_rank0(precheck, f"checking {ckpt_dir}"))

    real = getattr(engine, "checkpoint_engine", None)
    if real is not None:
        engine.checkpoint_engine = _MappedReader(real)
    try:
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    finally:
        if real is not None:
            engine.checkpoint_engine = real
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found nothing to load in {ckpt_dir / DS_TAG}")

    def restore_rng() -> None:
        rng = ckpt_dir / _rng_name(rank)
        if rank < manifest.world_size and rng.is_file():
            _restore_rng(rng)
        else:
            log.warning("checkpoint %s has no RNG state for rank %d; it keeps its current RNG", ckpt_dir, rank)

    _collective_check(restore_rng, f"restoring RNG state from {ckpt_dir}")
    log.info("loaded checkpoint %s (stage=%s step=%d)", ckpt_dir, manifest.stage, manifest.step)
    return manifest


# --- internals: distributed -------------------------------------------------------------------------------
def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if _dist() else 1


def _broadcast(obj: Any, group: Any = None) -> Any:
    if not _dist():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _gather(obj: Any, group: Any = None) -> list[Any]:
    if not _dist():
        return [obj]
    out: list[Any] = [None] * _world_size()
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def _on_rank0(fn: Callable[[], Any], what: str, group: Any = None) -> Any:
    """fn() on rank 0, its result broadcast; if it raised, CheckpointError on EVERY rank."""
    res = None
    if _rank() == 0:
        try:
            res = ("ok", fn())
        except CheckpointError as e:
            res = ("err", str(e))
        except Exception as e:  # noqa: BLE001 - reported to all ranks below
            res = ("err", f"{what} failed on rank 0: {type(e).__name__}: {e}")
    kind, value = _broadcast(res, group)
    if kind == "err":
        raise CheckpointError(value)
    return value


def _collective_check(fn: Callable[[], None] | None, what: str, group: Any = None) -> None:
    """Run fn on this rank (None: nothing to do), then raise on EVERY rank if it failed on any: a failure
    on one rank must not leave the others waiting in the next collective."""
    err = None
    if fn is not None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported to all ranks below
            err = f"rank {_rank()}: {type(e).__name__}: {e}"
    errors = [e for e in _gather(err, group) if e]
    if errors:
        raise CheckpointError(f"{what} failed: " + " | ".join(errors))


# --- internals: engine state ------------------------------------------------------------------------------
def _lr_schedule(engine: Any) -> dict[str, Any] | None:
    sched = getattr(engine, "lr_scheduler", None)
    out: dict[str, Any] = {}
    get_lr = getattr(engine, "get_lr", None)
    if callable(get_lr):
        try:
            out["last_lr"] = [float(x) for x in get_lr()]
        except Exception:  # noqa: BLE001 - optional information
            pass
    if sched is not None:
        out["step"] = getattr(sched, "last_epoch", None)
        if hasattr(sched, "state_dict"):
            out["state_dict"] = _jsonable(sched.state_dict())
    return out or None


def _zero_stage(engine: Any) -> int | None:
    fn = getattr(engine, "zero_optimization_stage", None)
    return int(fn()) if callable(fn) else None


def _motus_version() -> str:
    from motus import __version__

    return __version__


def _jsonable(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return repr(x)


# --- internals: RNG ---------------------------------------------------------------------------------------
def _rng_name(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states (fresh objects: what `rng-rank{r}.pt` holds)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": random.getstate(),
    }
    return state


def _restore_rng(path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    npst = state["numpy"]
    np.random.set_state((npst["bit_generator"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    random.setstate(state["python"])


# --- internals: files -------------------------------------------------------------------------------------
def _list_files(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def _describe(path: Path, *, hash_files: bool, fsync: bool) -> dict[str, Any]:
    size = path.stat().st_size
    digest = None
    if hash_files or fsync:
        h = hashlib.sha256() if hash_files else None
        with open(path, "rb") as f:
            if h is not None:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
            if fsync:
                os.fsync(f.fileno())
        digest = h.hexdigest() if h is not None else None
    return {"bytes": size, "sha256": digest}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check(d: Path, *, check_hashes: bool, check_extra: bool = False, expect_step: int | None = None) -> list[str]:
    if not d.is_dir():
        return [f"{d} does not exist"]
    try:
        manifest = CheckpointManifest.read(d)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    if expect_step is not None and manifest.step != expect_step:
        problems.append(f"manifest says step {manifest.step}, the directory name says {expect_step}")
    for rel, entry in sorted(manifest.files.items()):
        p = d / rel
        if not p.is_file():
            problems.append(f"missing file {rel}")
            continue
        size = p.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{rel} has {size} bytes, manifest says {entry.get('bytes')}")
        elif check_hashes and entry.get("sha256") and _sha256(p) != entry["sha256"]:
            problems.append(f"{rel} sha256 differs from the manifest")
    extra = sorted(set(_list_files(d)) - set(manifest.files) - {MANIFEST}) if check_extra else []
    if extra:
        problems.append(f"files not in the manifest: {extra}")
    if check_hashes and manifest.content_hash is not None and content_hash(manifest.files) != manifest.content_hash:
        problems.append("content_hash does not match the file list")
    return problems


def _write_text(path: Path, text: str, *, fsync: bool) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src -> dst; an existing dst (an earlier attempt at the same step) is first moved to a .tmp-
    name, so at no moment does ``dst`` name a half-deleted checkpoint."""
    old = None
    if dst.exists():
        old = dst.with_name(f".tmp-{dst.name}-{secrets.token_hex(4)}-replaced")
        os.replace(dst, old)
        log.warning("replacing existing checkpoint %s (earlier attempt at the same step)", dst)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _supersede_newer(root: Path, step: int) -> None:
    for s, d in list_step_dirs(root):
        if s > step:
            to = d.with_name(f"superseded-{d.name}-{secrets.token_hex(4)}")
            os.replace(d, to)
            log.warning("checkpoint %s is newer than the step being saved (%d): moved aside to %s", d, step, to)


def remove_leftovers(root: Path) -> list[Path]:
    """`.tmp-*` folders of saves that never finished (a crash, a full disk): safe to remove only while no other job
    writes into `root` (the run folder's lock, `motus.train.run_lock`). Returns what was removed."""
    gone = []
    if Path(root).is_dir():
        for p in sorted(Path(root).iterdir()):
            if p.name.startswith(".tmp-") and p.is_dir():
                log.info("removing leftover %s", p)
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def _prune(root: Path, keep_last: int | None, *, keep: Path) -> None:
    remove_leftovers(root)
    if keep_last is None:
        return
    complete = [d for _, d in list_step_dirs(root)]
    for d in complete[:-keep_last]:
        if d == keep:
            continue
        trash = d.with_name(f".tmp-{d.name}-{secrets.token_hex(4)}-pruned")
        os.replace(d, trash)  # atomic: the scan never sees a half-deleted step-* dir
        shutil.rmtree(trash, ignore_errors=True)
        log.info("pruned %s", d)
