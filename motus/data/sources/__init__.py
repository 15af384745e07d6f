"""Sources: readers that turn data in someone else's layout into `Episode`s.

Source kinds (each a module here, each a generator of ``Episode | SourceError``):

* ``lerobot``      -- LeRobot datasets on disk, layouts v2.0/v2.1 (one parquet and one mp4 per episode)
                      and v3.0 (many episodes packed per parquet and per mp4), videos or embedded images.
                      Labelled: actions, state, task text.                      ``read_lerobot``
* ``motus_layout`` -- the official Motus folder layout: ``videos/*.mp4`` (the composed three-view clip),
                      ``qpos/*.pt`` (joint positions) and ``metas/*.txt`` (instruction), matched by stem.
                                                                                ``read_motus_folder``
* ``mp4_folder``   -- a folder of plain videos (level 2 of the pyramid: unlabelled, actions=None), with
                      optional resize, frame cap and instruction from the file name or a sidecar .txt.
                                                                                ``read_mp4_folder``
* ``simulators``   -- episodes rolled out in simulation (written separately; not imported here).

Error contract, shared by every reader:

* A problem confined to one episode (a missing or unreadable file, an undecodable video, lengths that do
  not agree) never aborts the read: the reader yields a ``SourceError`` naming the episode, the file, the
  reason and its code, and goes on with the next episode. Ingest quarantines it.
* Two source episodes claiming one identity are both yielded as ``SourceError`` (code
  ``episode.duplicate_id``): which of them is the real one cannot be known, so neither is kept.
* Widths the source's metadata declares go into ``Episode.declared`` (ingest pads only a declared-narrow
  episode), and data that contradicts its declaration is an error for that episode (``shape.mismatch``).
* A source that cannot be read at all (no metadata file, bad JSON, an unknown format version, a missing
  root) raises ``SourceUnreadable`` naming the offending path, when the reader is called.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SourceError", "SourceUnreadable", "sanitize_episode_id"]


@dataclass(frozen=True)
class SourceError:
    """One episode a source could not produce: which episode, which file, why (any length: the whole text goes
    to the tier's ingest log) and a reason code (`motus.data.reasons`) for the one-line quarantine reason."""

    episode_ref: str
    file: str
    reason: str
    code: str = "source.unreadable"

    def __str__(self) -> str:
        return f"{self.episode_ref}: {self.reason} ({self.file})"


class SourceUnreadable(Exception):
    """The whole source cannot be read; ``path`` names the offending file or folder."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_ID = 128


def sanitize_episode_id(raw: str) -> str:
    """Map any source reference to a valid, deterministic episode id (``^[A-Za-z0-9_-]{1,128}$``).

    A reference already in the alphabet is kept as is. Otherwise every run of other characters
    (dots, slashes, spaces, non-ASCII) becomes ``_`` and an 8-hex digest of the original is appended, so two
    different references never collide after sanitising ("a b" vs "a_b"). Over-long ids are cut and keep
    the digest.
    """
    raw = str(raw)
    if raw and _BAD.search(raw) is None and len(raw) <= _MAX_ID:
        return raw
    digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    base = _BAD.sub("_", raw).strip("_") or "episode"
    return f"{base[: _MAX_ID - 9]}-{digest}"
