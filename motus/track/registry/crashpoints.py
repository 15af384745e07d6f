"""Named points where a test can make the registering process die as a crash would (SIGKILL, no cleanup).

Registration is several writes to two stores (artifacts, then the version, then the alias and its audit
entry); a process killed between any two of them must leave a state the next `register` completes, never a
second version or an unfetchable one. The only way to prove that for every gap is to die in each gap for real:
``MOTUS_CRASHPOINT=<name>`` in the environment kills this process at that point. Unset (always, outside
tests), a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "MOTUS_CRASHPOINT"
POINTS = ("registry.uploaded", "registry.created")


def crashpoint(name: str) -> None:
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}; known: {POINTS}")
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
