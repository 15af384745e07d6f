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

Cost of ``hash_files=True`` (the default): every byte of the checkpoint is read back once to compute its
sha256. The files are shared out over the ranks (file i is hashed by rank i % world_size) so the wall time is
about ``checkpoint_bytes / (world_size * read_bandwidth)`` when the storage scales with readers; on one
shared NFS mount it is ``checkpoint_bytes / mount_bandwidth`` (a Motus ``full`` checkpoint with its Adam
state is tens of GB: minutes on slow storage). Pass ``hash_files=False`` to record sizes only: the manifest
then has ``sha256: null`` per file and ``content_hash: null``, find_latest_complete still checks sizes, and
lineage has no content hash for that checkpoint. ``fsync=True`` (the default) flushes every file before the
rename so a crash of the machine, not only of the process, cannot leave a ``step-N`` with torn files.

One job writes to a run directory at a time. Saving step N while complete checkpoints with a step above N
exist (a job was restarted from an older checkpoint by hand) moves those aside as
``superseded-step-M-<nonce>`` (kept, never picked, named in a warning), so the history stays linear.

Every function that takes an ``engine`` is collective: all ranks call it, in the same order. The engine is
used only through ``save_checkpoint`` / ``load_checkpoint`` (plus ``lr_scheduler``, ``get_lr`` and
``zero_optimization_stage`` when present); nothing here depends on DeepSpeed's file layout inside ``ds/``,
so the ZeRO stage does not matter (ZeRO-2 and ZeRO-3 are tested). Needs a filesystem that every rank sees
at the same path.
"""

from __future__ import annotations

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
from collections.abc import Callable
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
    """Write ``root/step-%06d`` atomically and point ``root/latest`` at it. Collective; same path on every rank.

    keep_last: complete checkpoints to keep after this one is written (>= 1; the newest is never pruned),
    or None to keep all. Leftover ``.tmp-*`` dirs of crashed saves are removed at the same time.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    root = Path(root)
    rank, world = _rank(), _world_size()
    final = root / step_dir_name(step)

    # 1. rank 0 names the tmp dir; everyone writes into it
    def make_tmp() -> str:
        root.mkdir(parents=True, exist_ok=True)
        name = f".tmp-{step_dir_name(step)}-{secrets.token_hex(4)}"
        (root / name).mkdir()
        return name

    tmp = root / _on_rank0(make_tmp, f"creating a checkpoint dir under {root}")

    try:
        return _write_and_commit(engine, root, tmp, final, step, stage, data_position, config_hash, parent,
                                 wall_seconds, extra, keep_last, hash_files, fsync, rank, world)
    except Exception as e:
        why = _out_of_space(root, tmp, e, engine)
        if why is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a rerun must find room again, not a dead partial save
        raise CheckpointError(why) from None


def _out_of_space(root: Path, tmp: Path, error: BaseException, engine: Any) -> str | None:
    """The message for a save that failed because the disk is full (ENOSPC anywhere in the error's chain, or less
    room left than a checkpoint takes: torch and DeepSpeed report a full disk as `iostream error` / `file write
    failed`), or None for any other failure."""
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    enospc = any(getattr(x, "errno", None) == errno.ENOSPC or "No space left" in str(x) for x in chain)
    previous = [d for _, d in list_step_dirs(root)]
    if previous:
        need = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file())
    else:  # weights, and an optimizer's two moments of the same size
        try:
            need = 3 * sum(p.numel() * p.element_size() for p in engine.module.parameters())
        except Exception:  # noqa: BLE001 - an engine without a module: judge by ENOSPC alone
            need = 0
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = 0
    if not enospc and free >= need:
        return None
    mb = lambda n: f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"  # noqa: E731
    return (f"no space left on {root} (a checkpoint needs ~{mb(need)}, {mb(free)} free): the partial save "
            f"{tmp.name} was removed; free space there or give the job another run folder")


def _write_and_commit(engine: Any, root: Path, tmp: Path, final: Path, step: int, stage: str, data_position: int,
                      config_hash: str, parent: str | None, wall_seconds: float, extra: dict[str, Any] | None,
                      keep_last: int | None, hash_files: bool, fsync: bool, rank: int, world: int) -> Path:
    client_state = {"motus": {"step": step, "stage": stage, "data_position": data_position,
                              "config_hash": config_hash}}
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client_state)
    _commit_decoupled(engine)
    _collective_check(lambda: _write_rng(tmp / _rng_name(rank)), f"writing RNG state into {tmp}")

    # 2. every rank hashes (and fsyncs) its share of the files; rank 0 gathers the list
    listing = _on_rank0(lambda: _list_files(tmp), f"listing {tmp}")
    mine: dict[str, dict[str, Any]] = {}

    def hash_share() -> None:
        for rel in listing[rank::world]:
            mine[rel] = _describe(tmp / rel, hash_files=hash_files, fsync=fsync)

    _collective_check(hash_share, f"hashing {tmp}")
    shares = _gather(mine)

    # 3. rank 0 commits: manifest, rename, latest
    def commit() -> None:
        files = {k: v for share in shares for k, v in share.items()}
        manifest = CheckpointManifest(
            stage=stage, step=step, data_position=int(data_position),
            lr_schedule=_lr_schedule(engine), rng_files=[_rng_name(r) for r in range(world)],
            config_hash=config_hash, parent=parent, world_size=world, zero_stage=_zero_stage(engine),
            wall_seconds=float(wall_seconds), created_at=datetime.now(timezone.utc).isoformat(),
            motus_version=_motus_version(), files=files, content_hash=content_hash(files),
            extra=_jsonable(extra or {}),
        )
        _write_text(tmp / MANIFEST, manifest.to_json(), fsync=fsync)
        if fsync:
            _fsync_dir(tmp)
        _supersede_newer(root, step)
        _replace_dir(tmp, final)
        if fsync:
            _fsync_dir(root)
        _write_text(root / (LATEST + ".tmp"), final.name + "\n", fsync=fsync)
        os.replace(root / (LATEST + ".tmp"), root / LATEST)
        if fsync:
            _fsync_dir(root)

    _on_rank0(commit, f"committing {tmp} -> {final}")

    # 4. prune (rank 0, best effort: a failed prune never fails the save)
    if rank == 0:
        try:
            _prune(root, keep_last, keep=final)
        except OSError as e:
            log.warning("pruning old checkpoints under %s failed: %s", root, e)
    log.info("saved checkpoint %s (stage=%s step=%d data_position=%d)", final, stage, step, data_position)
    return final


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

    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
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


def _broadcast(obj: Any) -> Any:
    if not _dist():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any]:
    if not _dist():
        return [obj]
    out: list[Any] = [None] * _world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _on_rank0(fn: Callable[[], Any], what: str) -> Any:
    """fn() on rank 0, its result broadcast; if it raised, CheckpointError on EVERY rank."""
    res = None
    if _rank() == 0:
        try:
            res = ("ok", fn())
        except CheckpointError as e:
            res = ("err", str(e))
        except Exception as e:  # noqa: BLE001 - reported to all ranks below
            res = ("err", f"{what} failed on rank 0: {type(e).__name__}: {e}")
    kind, value = _broadcast(res)
    if kind == "err":
        raise CheckpointError(value)
    return value


def _collective_check(fn: Callable[[], None] | None, what: str) -> None:
    """Run fn on this rank (None: nothing to do), then raise on EVERY rank if it failed on any: a failure
    on one rank must not leave the others waiting in the next collective."""
    err = None
    if fn is not None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported to all ranks below
            err = f"rank {_rank()}: {type(e).__name__}: {e}"
    errors = [e for e in _gather(err) if e]
    if errors:
        raise CheckpointError(f"{what} failed: " + " | ".join(errors))


def _commit_decoupled(engine: Any) -> None:
    """A decoupled (asynchronous) DeepSpeed checkpoint engine returns before its files are written; wait."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is not None and getattr(ce, "is_decoupled", lambda: False)():
        engine._commit_decoupled_checkpoint()


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


def _write_rng(path: Path) -> None:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": random.getstate(),
    }
    torch.save(state, path)


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
