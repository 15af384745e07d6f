"""The training container's entrypoint on a cluster: torchrun, with exit codes the Training Operator acts on.

A PyTorchJob's pods use `restartPolicy: ExitCode`: exit codes 1-127 are the job's own failure (never retried),
128-255 are retried (a signal, an OOM kill, an eviction). torchrun itself does not keep that contract: told to
stop (SIGTERM, as an eviction or a node drain does) it shuts its workers down and exits 1, and a worker that
failed only because a peer node vanished also makes it exit 1. Both would fail the whole job for good. This
wrapper runs torchrun in-process and exits 128 + the signal when it was signalled, and `PEER_LOST` when every
failed worker lost a peer or was killed, so that the operator restarts the pod and the job resumes from its
latest complete checkpoint.
"""

from __future__ import annotations

import sys

from .worker import PEER_LOST


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        print(f"motus node: stopped by signal {int(e.sigval)}; exiting {128 + int(e.sigval)} (retryable)",
              file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        if codes and all(c == PEER_LOST or c < 0 for c in codes):  # < 0: the worker was killed by a signal
            print(f"motus node: workers exited {codes} (a peer lost or killed); exiting {PEER_LOST} (retryable)",
                  file=sys.stderr)
            return PEER_LOST
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
