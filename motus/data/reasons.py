"""Quarantine reasons: one short coded line for tables and manifests, the whole story in the tier's ingest log.

A reason reads ``<code>: <message>``, e.g. ``timestamps.non_monotonic: row 7 at 0.200 s follows 0.233 s``. The
code is a stable dotted name a user can count and filter on (``motus data show`` groups by it); the message is
one line of at most ``MAX_REASON`` characters with every control character removed, because upstream text
(decoder errors, pyarrow messages) can run to kilobytes and carry terminal colour codes that would garble a
terminal or a table. The untruncated text is kept in ``<tier>/ingest.log`` (see ``detail_line``).
"""

from __future__ import annotations

import re

__all__ = ["MAX_REASON", "coded", "code_of", "one_line", "detail_line"]

MAX_REASON = 200
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")  # CSI sequences (colours), then other 2-byte escapes
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")
_CODE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """`text` without escape sequences or control characters, whitespace collapsed, cut to `limit` chars."""
    text = _CONTROL.sub(" ", _ANSI.sub("", str(text)))
    text = _SPACES.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def coded(code: str, message: str) -> str:
    """The reason line ``code: message``, at most MAX_REASON characters in all."""
    if not _CODE.match(code):
        raise ValueError(f"reason code {code!r} must be dotted lower-case words, e.g. 'timestamps.negative'")
    return one_line(f"{code}: {message}")


def code_of(reason: str) -> str:
    """The code of a reason line; 'unknown' for a line written without one (tiers built before codes)."""
    head = reason.split(":", 1)[0]
    return head if _CODE.match(head) else "unknown"


def detail_line(episode: str, file: str, code: str, detail: str) -> str:
    """One ingest-log line with the untruncated detail; control characters escaped, not dropped, so the log
    shows exactly what the source said without letting it drive the terminal."""
    safe = "".join(c if c == " " or not _CONTROL.match(c) else repr(c)[1:-1] for c in str(detail))
    return f"{episode}\t{code}\t{file}\t{safe}"
