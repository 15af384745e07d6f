"""Ingest: a tier's source -> validated episodes -> shards + manifest; bad episodes quarantined with reasons.

Ingest fails (IngestError, naming the file or tier) only when the source itself is unreadable or nothing
valid remains; a bad episode never stops the good ones, and a failed ingest leaves the previous tier intact.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..contracts import TierManifest
from .episode import Episode
from .sources import SourceError, SourceUnreadable
from .tier import TierSpec, TierWriter

# options the ingest step consumes itself; everything else goes to the source reader unchanged
INGEST_OPTIONS = ("drop_actions", "pad_actions", "limit", "require_instruction", "action_bounds", "codec",
                  "shard_mb")

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


def _episode_problems(ep: Episode, tier: Any, options: dict[str, Any]) -> list[str]:
    problems = ep.problems(require_instruction=bool(options.get("require_instruction", False)),
                           action_bounds=tuple(options["action_bounds"]) if options.get("action_bounds") else None,
                           require_actions=tier.action_dim is not None)
    if tier.action_dim is not None and ep.action_dim is not None and ep.action_dim != tier.action_dim:
        if ep.action_dim > tier.action_dim or not options.get("pad_actions", False):
            problems.append(f"actions are {ep.action_dim}-d, tier expects {tier.action_dim}-d"
                            + ("" if ep.action_dim > tier.action_dim else " (set pad_actions: true to pad)"))
    return problems


def ingest_tier(name: str, tier: Any, out_dir: str | Path, *, progress: Callable[[int, int], None] | None = None
                ) -> TierManifest:
    """Build one tier from its `params.yaml` section (a `motus.config.Tier`). Returns the manifest."""
    options = dict(tier.source.options)
    writer = TierWriter(out_dir, TierSpec(
        name=name, level=tier.level, embodiment=tier.embodiment, action_dim=tier.action_dim, fps=tier.fps,
        action_names=tuple(tier.action_names) if tier.action_names else None,
        codec=options.get("codec", "mp4"), pad_state=bool(options.get("pad_actions", False)), shard_bytes=int(float(options.get("shard_mb", 256)) * 2**20),
        source={"kind": tier.source.kind, "options": tier.source.options}, description=tier.description))
    good = bad = 0
    try:
        try:
            stream = open_source(tier.source.kind, options)
            limit = options.get("limit")
            stream = itertools.islice(stream, limit) if limit else stream
            for item in stream:
                if isinstance(item, SourceError):
                    writer.add_quarantined({"episode": item.episode_ref, "file": str(item.file), "reasons": [item.reason]})
                    bad += 1
                elif isinstance(item, Episode):
                    if options.get("drop_actions"):
                        item.actions = None
                        item.state = None
                    problems = _episode_problems(item, tier, options)
                    if item.episode_id in writer._ids:
                        problems.append(f"duplicate episode id '{item.episode_id}'")
                    if not problems and writer.state_problem(item):
                        problems.append(writer.state_problem(item))
                    if problems:
                        writer.add_quarantined({"episode": str(item.episode_id), "file": item.extra.get("file", ""),
                                                "source": item.source, "reasons": problems})
                        bad += 1
                    else:
                        writer.add(item)
                        good += 1
                else:
                    raise IngestError(f"source '{tier.source.kind}' yielded {type(item).__name__}, not an Episode")
                if progress:
                    progress(good, bad)
        except SourceUnreadable as e:
            raise IngestError(f"tier '{name}': source unreadable: {e}") from None
        if good == 0:
            raise IngestError(f"tier '{name}': no valid episodes ({bad} quarantined; first reasons: "
                              f"{[q['reasons'] for q in writer.quarantine[:3]]})")
        manifest = writer.close()
    except BaseException:
        writer.abort()
        raise
    return manifest

