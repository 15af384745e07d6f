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
from pathlib import Path
from typing import Any

from ..contracts import TierManifest
from .bounds import bounds_problem, declared_width, resolve_bounds
from .episode import Episode
from .reasons import code_of, coded, detail_line
from .sources import SourceError, SourceUnreadable
from .tier import TierSpec, TierWriter

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


def _episode_problems(ep: Episode, tier: Any, options: dict[str, Any], first_width: dict[str, int]) -> list[str]:
    problems = ep.problems(require_instruction=bool(options.get("require_instruction", False)),
                           action_bounds=tuple(options["action_bounds"]) if options.get("action_bounds") else None,
                           require_actions=tier.action_dim is not None)
    width = _width_problem(ep, tier, options, first_width)
    if width:
        problems.append(width)
    bounds = resolve_bounds(options.get("physical_bounds"), ep.embodiment)
    if bounds:
        names = list(tier.action_names) if tier.action_names else None
        for key, values in (("actions", ep.actions), ("state", ep.state)):
            found = bounds_problem(key, values, bounds.get(key), names)
            if found:
                problems.append(coded(*found))
    return problems


def _quarantine(writer: TierWriter, episode: str, file: str, reasons: list[str], *, details: list[str] | None = None,
                **extra: Any) -> None:
    """One quarantine record (coded one-line reasons) and its untruncated details in the ingest log."""
    writer.add_quarantined({"episode": episode, "file": file, "reasons": reasons, **extra})
    for reason, detail in zip(reasons, details or reasons, strict=True):
        writer.log_lines.append(detail_line(episode, file, code_of(reason), detail))


def ingest_tier(name: str, tier: Any, out_dir: str | Path, *, progress: Callable[[int, int], None] | None = None
                ) -> TierManifest:
    """Build one tier from its `params.yaml` section (a `motus.config.Tier`). Returns the manifest."""
    options = dict(tier.source.options)
    try:
        resolve_bounds(options.get("physical_bounds"), tier.embodiment)
    except (TypeError, ValueError) as e:
        raise IngestError(f"tier '{name}': source option physical_bounds must be 'default', 'off', [[lo, hi], ...] "
                          f"or {{actions: [...], state: [...]}}: {e}") from None
    writer = TierWriter(out_dir, TierSpec(
        name=name, level=tier.level, embodiment=tier.embodiment, action_dim=tier.action_dim, fps=tier.fps,
        action_names=tuple(tier.action_names) if tier.action_names else None,
        codec=options.get("codec", "mp4"), pad_state=bool(options.get("pad_actions", False)), shard_bytes=int(float(options.get("shard_mb", 256)) * 2**20),
        source={"kind": tier.source.kind, "options": tier.source.options}, description=tier.description))
    seen = 0
    claims: dict[str, list[str]] = {}  # episode id -> the file of every source episode that claimed it
    first_width: dict[str, int] = {}
    try:
        try:
            stream = open_source(tier.source.kind, options)
            limit = options.get("limit")
            stream = itertools.islice(stream, limit) if limit else stream
            for item in stream:
                seen += 1
                if isinstance(item, SourceError):
                    _quarantine(writer, item.episode_ref, str(item.file), [coded(item.code, item.reason)],
                                details=[item.reason])
                elif isinstance(item, Episode):
                    _ingest_episode(writer, item, tier, options, claims, first_width)
                else:
                    raise IngestError(f"source '{tier.source.kind}' yielded {type(item).__name__}, not an Episode")
                if progress:
                    progress(len(writer.index), len(writer.quarantine))
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


def _ingest_episode(writer: TierWriter, ep: Episode, tier: Any, options: dict[str, Any],
                    claims: dict[str, list[str]], first_width: dict[str, int]) -> None:
    """Keep one episode, or quarantine it (and, for a duplicate id, every earlier claimant too)."""
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
    problems = _episode_problems(ep, tier, options, first_width)
    if not problems and writer.state_problem(ep):
        problems.append(coded("state.width", writer.state_problem(ep)))
    if problems:
        _quarantine(writer, eid, file, problems, source=ep.source)
    else:
        writer.add(ep)

