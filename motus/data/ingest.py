"""Ingest: a tier's source -> validated episodes -> shards + manifest; bad episodes quarantined with reasons.

Ingest fails (IngestError, naming the file or tier) only when the source itself is unreadable or nothing
valid remains; a bad episode never stops the good ones, and a failed ingest leaves the previous tier intact.

Every episode the source yields is accounted for: the manifest's ``source_episodes`` is kept + quarantined.
A quarantine reason is one coded line (``motus.data.reasons``); the untruncated detail goes to the tier's
``ingest.log``. Beyond each episode's own checks, ingest refuses:

* an id claimed twice: every claimant is quarantined (``episode.duplicate_id``), the one already stored
  withdrawn from its shard, because which of them the id really names cannot be known;
* joint values outside the embodiment's physical range (``motus.data.bounds``, on by default);
* a width other than the one declared for the episode (by the source's metadata, else by the embodiment's
  table, else by the embodiment's first episode): ``pad_actions`` pads only an episode whose data is declared
  narrower, never a row that lost a joint.

Kept episodes without an instruction are counted (``without_instruction``) and listed in the log even when the
tier does not require one.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contracts import TierManifest
from .bounds import bounds_problem, declared_width, resolve_bounds
from .episode import Episode
from .reasons import code_of, coded, detail_line
from .sources import SourceError, SourceUnreadable
from .tier import PreparedEpisode, TierSpec, TierWriter, prepare_episode

# options the ingest step consumes itself; everything else goes to the source reader unchanged
INGEST_OPTIONS = ("drop_actions", "pad_actions", "limit", "require_instruction", "action_bounds", "codec",
                  "shard_mb", "physical_bounds")

# kind -> "module:function" (imported lazily: simulators pull in MuJoCo)
SOURCE_KINDS: dict[str, str] = {
    "simulator": "motus.data.ingest:simulator_source",
    "lerobot": "motus.data.sources.lerobot:read_lerobot",
    "motus-folder": "motus.data.sources.motus_layout:read_motus_folder",
    "mp4-folder": "motus.data.sources.mp4_folder:read_mp4_folder",
    "composite": "motus.data.ingest:composite_source",
    "python": "motus.data.ingest:python_source",
}

SIMULATORS: dict[str, str] = {
    "metaworld": "motus.data.sources.simulators:metaworld_episodes",
    "aloha": "motus.data.sources.simulators:aloha_episodes",
    "aloha-random": "motus.data.sources.simulators:aloha_random_reachable_episodes",
}


class IngestError(Exception):
    pass


def _load(ref: str) -> Callable[..., Any]:
    module, fn = ref.split(":")
    return getattr(importlib.import_module(module), fn)


def simulator_source(sim: str, **options: Any) -> Iterator[Episode]:
    if sim not in SIMULATORS:
        raise IngestError(f"unknown simulator '{sim}'; expected one of {sorted(SIMULATORS)}")
    return _load(SIMULATORS[sim])(**options)


def composite_source(parts: list[dict[str, Any]]) -> Iterator[Episode | SourceError]:
    """Several sources into one tier (e.g. the multi-robot tier: two embodiments)."""
    for part in parts:
        yield from open_source(part["kind"], part.get("options", {}))


def python_source(function: str, file: str | None = None, **kwargs: Any) -> Iterable[Episode | SourceError]:
    """A reader of your own: `function` is "module:name", or just "name" inside `file` (a .py path)."""
    if file:
        import importlib.util

        path = Path(file).expanduser()
        if not path.exists():
            raise SourceUnreadable(path, "python source file not found")
        spec = importlib.util.spec_from_file_location(f"motus_user_source_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fn = getattr(module, function, None)
        if fn is None:
            raise SourceUnreadable(path, f"no function {function!r}")
    else:
        fn = _load(function)
    return fn(**kwargs)


def open_source(kind: str, options: dict[str, Any]) -> Iterable[Episode | SourceError]:
    if kind not in SOURCE_KINDS:
        raise IngestError(f"unknown source kind '{kind}'; expected one of {sorted(SOURCE_KINDS)}")
    reader = _load(SOURCE_KINDS[kind])
    opts = {k: v for k, v in options.items() if k not in INGEST_OPTIONS}
    if "root" in opts:
        opts["root"] = Path(opts["root"]).expanduser()
    try:
        return reader(**opts)
    except TypeError as e:
        raise IngestError(f"source '{kind}': bad options {sorted(opts)}: {e}") from None


def _width_problem(ep: Episode, tier: Any, options: dict[str, Any], first_width: dict[str, int]) -> str | None:
    """The action width against the tier's, and against the width declared for this episode."""
    if tier.action_dim is None or ep.action_dim is None or ep.actions is None or ep.actions.ndim != 2:
        return None
    if "actions" in ep.declared:
        declared, by = ep.declared["actions"], "the source declares"
    elif declared_width(ep.embodiment) is not None:
        declared, by = declared_width(ep.embodiment), f"a '{ep.embodiment}' robot has"
    else:
        declared, by = first_width.setdefault(ep.embodiment, ep.action_dim), f"the first '{ep.embodiment}' episode has"
    if ep.action_dim != declared:
        return coded("actions.width", f"actions are {ep.action_dim}-d, {by} {declared}-d (a partial row is never "
                                      f"padded); tier expects {tier.action_dim}-d")
    if ep.action_dim > tier.action_dim:
        return coded("actions.width", f"actions are {ep.action_dim}-d, tier expects {tier.action_dim}-d")
    if ep.action_dim < tier.action_dim and not options.get("pad_actions", False):
        return coded("actions.width", f"actions are {ep.action_dim}-d, tier expects {tier.action_dim}-d (the data is "
                                      f"declared {declared}-d: set pad_actions: true to zero-pad)")
    return None


def _own_problems(ep: Episode, check: _Check) -> list[str]:
    """The episode's checks that depend on nothing ingested before it (so a worker process can run them)."""
    return ep.problems(require_instruction=check.require_instruction, action_bounds=check.action_bounds,
                       require_actions=check.action_dim is not None)


def _bounds_problems(ep: Episode, check: _Check) -> list[str]:
    out = []
    bounds = resolve_bounds(check.physical_bounds, ep.embodiment)
    if bounds:
        names = list(check.action_names) if check.action_names else None
        for key, values in (("actions", ep.actions), ("state", ep.state)):
            found = bounds_problem(key, values, bounds.get(key), names)
            if found:
                out.append(coded(*found))
    return out


@dataclass(frozen=True)
class _Check:
    """What the order-free checks of an episode read from the tier's config (picklable, sent to workers once)."""

    action_dim: int | None
    action_names: tuple[str, ...] | None
    require_instruction: bool
    action_bounds: tuple[float, float] | None
    physical_bounds: Any

    @classmethod
    def of(cls, tier: Any, options: dict[str, Any]) -> _Check:
        return cls(action_dim=tier.action_dim, action_names=tuple(tier.action_names) if tier.action_names else None,
                   require_instruction=bool(options.get("require_instruction", False)),
                   action_bounds=tuple(options["action_bounds"]) if options.get("action_bounds") else None,
                   physical_bounds=options.get("physical_bounds"))


@dataclass
class _Work:
    """The order-free part of ingesting one episode: its own problems, its bounds problems and, when neither
    found anything, the episode encoded for its shard. An exception is kept, not raised, and re-raised
    only where the one-at-a-time ingest would have met it (an episode later found to be a duplicate, or to
    fail an order-dependent check, never reaches the step that raised)."""

    own: list[str] | None = None
    bounds: list[str] | None = None
    prepared: PreparedEpisode | None = None
    failed: BaseException | None = None  # raised by a check: the ingest stops at this episode
    prepare_failed: BaseException | None = None  # raised by the encoding: the ingest stops if it keeps it


def _work(ep: Episode, check: _Check, spec: TierSpec) -> _Work:
    out = _Work()
    try:
        out.own = _own_problems(ep, check)
        out.bounds = _bounds_problems(ep, check)
    except Exception as e:  # noqa: BLE001 - handed back and re-raised in source order
        out.failed = e
        return out
    if not out.own and not out.bounds:  # otherwise quarantined whatever else is found: nothing to encode
        try:
            out.prepared = prepare_episode(spec, ep)
        except Exception as e:  # noqa: BLE001 - handed back and re-raised in source order
            out.prepare_failed = e
    return out


# a worker process's check and spec, set once by the pool's initializer instead of pickled with every batch
_WORKER_CONTEXT: tuple[_Check, TierSpec] | None = None


def _worker_init(check: _Check, spec: TierSpec) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = (check, spec)


def _work_batch(episodes: list[Episode]) -> list[_Work]:
    check, spec = _WORKER_CONTEXT
    return [_work(ep, check, spec) for ep in episodes]


def _quarantine(writer: TierWriter, episode: str, file: str, reasons: list[str], *, details: list[str] | None = None,
                **extra: Any) -> None:
    """One quarantine record (coded one-line reasons) and its untruncated details in the ingest log."""
    writer.add_quarantined({"episode": episode, "file": file, "reasons": reasons, **extra})
    for reason, detail in zip(reasons, details or reasons, strict=True):
        writer.log_lines.append(detail_line(episode, file, code_of(reason), detail))


def ingest_tier(name: str, tier: Any, out_dir: str | Path, *, progress: Callable[[int, int], None] | None = None,
                workers: int = 1) -> TierManifest:
    """Build one tier from its `params.yaml` section (a `motus.config.Tier`). Returns the manifest.

    workers > 1 validates and encodes episodes in that many processes while this one reads the source and
    writes in source order, so the tier (bytes, manifest, quarantine, log) is the same as with one."""
    if workers < 1:
        raise IngestError(f"tier '{name}': workers must be >= 1, got {workers}")
    options = dict(tier.source.options)
    try:
        resolve_bounds(options.get("physical_bounds"), tier.embodiment)
    except (TypeError, ValueError) as e:
        raise IngestError(f"tier '{name}': source option physical_bounds must be 'default', 'off', [[lo, hi], ...] "
                          f"or {{actions: [...], state: [...]}}: {e}") from None
    spec = TierSpec(
        name=name, level=tier.level, embodiment=tier.embodiment, action_dim=tier.action_dim, fps=tier.fps,
        action_names=tuple(tier.action_names) if tier.action_names else None,
        codec=options.get("codec", "mp4"), pad_state=bool(options.get("pad_actions", False)), shard_bytes=int(float(options.get("shard_mb", 256)) * 2**20),
        source={"kind": tier.source.kind, "options": tier.source.options}, description=tier.description)
    writer = TierWriter(out_dir, spec)
    check = _Check.of(tier, options)
    seen = 0
    claims: dict[str, list[str]] = {}  # episode id -> the file of every source episode that claimed it
    first_width: dict[str, int] = {}
    try:
        try:
            stream = open_source(tier.source.kind, options)
            limit = options.get("limit")
            stream = itertools.islice(stream, limit) if limit else stream
            if workers > 1:
                items: Iterable[tuple[Any, _Work | None]] = _parallel(stream, options, check, spec, workers)
            else:  # the work is done inline, when (and only if) the episode's turn needs it
                items = ((item, None) for item in stream)
            try:
                for item, done in items:
                    seen += 1
                    if isinstance(item, SourceError):
                        _quarantine(writer, item.episode_ref, str(item.file), [coded(item.code, item.reason)],
                                    details=[item.reason])
                    elif isinstance(item, Episode):
                        _ingest_episode(writer, item, tier, options, claims, first_width, check, done)
                    else:
                        raise IngestError(f"source '{tier.source.kind}' yielded {type(item).__name__}, not an Episode")
                    if progress:
                        progress(len(writer.index), len(writer.quarantine))
            finally:  # an episode's error ends the loop early: shut the worker pool down now, not at collection
                close = getattr(items, "close", None)
                if close is not None:
                    close()
        except SourceUnreadable as e:
            raise IngestError(f"tier '{name}': source unreadable: {e}") from None
        if not writer.index:
            raise IngestError(f"tier '{name}': no valid episodes ({len(writer.quarantine)} quarantined; first "
                              f"reasons: {[q['reasons'] for q in writer.quarantine[:3]]})")
        writer.source_episodes = seen
        writer.without_instruction = sum(1 for r in writer.index if not any(s.strip() for s in r["instructions"]))
        for r in writer.index:
            if not any(s.strip() for s in r["instructions"]):
                writer.log_lines.append(detail_line(r["id"], claims[r["id"]][0], "instruction.missing",
                                                    "kept without a language instruction"))
        manifest = writer.close()
    except BaseException:
        writer.abort()
        raise
    return manifest


# a batch sent to a worker closes at this many episodes or this many bytes of frames, whichever comes first:
# small episodes amortise the inter-process round trip, large ones keep what is in flight to a few batches
BATCH_EPISODES = 64
BATCH_BYTES = 16 * 2**20


def _frame_bytes(ep: Episode) -> int:
    return sum(getattr(a, "nbytes", 0) for a in ep.frames.values()) if isinstance(ep.frames, dict) else 0


def _parallel(stream: Iterable[Any], options: dict[str, Any], check: _Check, spec: TierSpec, workers: int
              ) -> Iterator[tuple[Any, _Work | None]]:
    """The source's items in source order, each episode with its work done by a pool of `workers` processes.

    The source is read here, in this process (readers are iterators, some hold open files), at most
    2 x `workers` batches ahead of the writer, so memory stays flat however long the source is. An error the
    source raises is re-raised only after every item it yielded before it has been handed on, as when
    ingesting one at a time."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    pending: deque[tuple[list[Any], Any]] = deque()  # (items of a batch, its future; None: nothing to do)
    source = iter(stream)
    source_error: BaseException | None = None
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(check, spec)) as pool:
        try:
            while True:
                batch: list[Any] = []
                size = 0
                while source_error is None and len(batch) < BATCH_EPISODES and size < BATCH_BYTES:
                    try:
                        item = next(source)
                    except StopIteration:
                        source_error = StopIteration()
                        break
                    except Exception as e:  # noqa: BLE001 - re-raised once the items before it are written
                        source_error = e
                        break
                    if isinstance(item, Episode) and options.get("drop_actions"):
                        item.actions = None  # before pickling: nothing to send that is dropped anyway
                        item.state = None
                    batch.append(item)
                    if isinstance(item, Episode):
                        size += _frame_bytes(item)
                if batch:
                    episodes = [it for it in batch if isinstance(it, Episode)]
                    pending.append((batch, pool.submit(_work_batch, episodes) if episodes else None))
                while pending and (len(pending) >= 2 * workers or source_error is not None):
                    items, future = pending.popleft()
                    done = iter(future.result() if future is not None else ())
                    for it in items:
                        yield it, next(done) if isinstance(it, Episode) else None
                if source_error is not None and not pending:
                    break
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()
    if not isinstance(source_error, StopIteration):
        raise source_error
def _ingest_episode(writer: TierWriter, ep: Episode, tier: Any, options: dict[str, Any],
                    claims: dict[str, list[str]], first_width: dict[str, int], check: _Check,
                    done: _Work | None = None) -> None:
    """Keep one episode, or quarantine it (and, for a duplicate id, every earlier claimant too). `done` is
    the episode's order-free work when a worker already did it; the checks that depend on the episodes
    before this one (ids, the first width of an embodiment, the tier's state width) are made here."""
    if options.get("drop_actions"):
        ep.actions = None
        ep.state = None
    eid, file = str(ep.episode_id), str(ep.extra.get("file", ""))
    earlier = claims.setdefault(eid, [])
    earlier.append(file)
    if len(earlier) > 1:
        why = f"episode id '{eid}' is claimed by {len(earlier)} source episodes"
        if eid in writer._ids and eid not in writer._withdrawn:
            writer.withdraw(eid)
            _quarantine(writer, eid, earlier[0], [coded("episode.duplicate_id", why + " (this one was read first)")],
                        source=ep.source)
        _quarantine(writer, eid, file, [coded("episode.duplicate_id", why)], source=ep.source)
        return
    if done is None:
        done = _work(ep, check, writer.spec)
    if done.failed is not None:
        raise done.failed
    problems = list(done.own)
    width = _width_problem(ep, tier, options, first_width)
    if width:
        problems.append(width)
    problems += done.bounds
    if not problems and writer.state_problem(ep):
        problems.append(coded("state.width", writer.state_problem(ep)))
    if problems:
        _quarantine(writer, eid, file, problems, source=ep.source)
    else:
        if done.prepare_failed is not None:
            raise done.prepare_failed
        writer.add_prepared(done.prepared)
