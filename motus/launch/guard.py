"""The job's guard: the leader of a local job's process group, which takes the job down with its launcher.

A local job runs in a process group (session) of its own, so that cancelling it reaches torchrun and every
worker. The price: killing `motus train` (any signal, its whole group, or its parent shell dying) would leave the
job running, orphaned, still writing its run folder. The guard closes that gap: it starts the job's command in
its own group, watches the launcher's pid, and when the launcher is gone terminates the group (SIGTERM, then
SIGKILL after a grace period). It forwards nothing and decides nothing else: it exits as the job did (the same
exit code, or the same signal), so the launcher sees the job's own outcome.

Run as a script by path (`python guard.py --parent PID [--grace S] -- CMD...`): it imports only the standard
library, so it costs milliseconds, not a package import.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.25


def _parent_gone(parent: int) -> bool:
    if os.getppid() != parent:  # re-parented: the launcher died
        return True
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _take_down(child: subprocess.Popen, grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(0, sig)  # the whole group: torchrun, its workers, the warm job's hand-over process
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if child.poll() is not None:
                return
            time.sleep(0.05)


def _die_with(guard: int) -> None:
    """In the job's leader, before exec: SIGTERM when the guard dies (a `kill -9` of the guard itself), so the
    job never outlives what its launcher waits on. SIGTERM, not SIGKILL: torchrun stops its workers on it."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (the guard is single-threaded)
    if os.getppid() != guard:  # the guard died before the line above: nothing would ever signal us
        os._exit(1)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        sys.stderr.write("usage: guard.py --parent PID [--grace S] -- COMMAND...\n")
        return 2
    split = argv.index("--")
    opts, cmd = argv[:split], argv[split + 1:]
    parent = int(opts[opts.index("--parent") + 1])
    grace = float(opts[opts.index("--grace") + 1]) if "--grace" in opts else 10.0
    # a SIGTERM / SIGINT sent to the group reaches the job directly; the guard itself waits for the job's end
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    me = os.getpid()
    child = subprocess.Popen(cmd, preexec_fn=lambda: _die_with(me))
    while child.poll() is None:
        if _parent_gone(parent):
            sys.stderr.write(f"motus guard: the launcher (pid {parent}) is gone: stopping the job's process group\n")
            _take_down(child, grace)
            break
        time.sleep(POLL_S)
    code = child.wait()
    if code < 0:  # die of the same signal, so the launcher reads the same outcome
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
