"""The `Launcher` protocol: where a training job runs is configuration (`MOTUS_LAUNCHER`), never code.

Every caller that starts a training job (`motus train`, `motus latent-action train`, the pipeline) builds one
`JobSpec` and hands it to `motus.launch.factory.launcher_for(settings)`. The two launchers take the same spec:

- `local`: torchrun processes on this machine (`motus.launch.local.LocalLauncher`).
- `kubernetes`: a PyTorchJob through the kubeflow-training SDK (`motus.launch.kubernetes.KubernetesLauncher`),
  rendered exactly as `motus k8s render` renders it.

`submit` returns at once with a handle; `wait` blocks until the job ends and says how (`JobOutcome`); the
exit code follows the local convention (0 success, <0 or 137/143 killed from outside) so callers can tell a
preemption (retry) from a failure (stop) whatever ran it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..contracts import JobSpec

SUCCEEDED, FAILED, KILLED, CANCELLED = "Succeeded", "Failed", "Killed", "Cancelled"


@dataclass(frozen=True)
class JobHandle:
    launcher: str  # local | kubernetes
    name: str  # the process group id (local) or the PyTorchJob name (kubernetes)
    run_dir: Path
    detail: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class JobOutcome:
    state: str  # Succeeded | Failed | Killed (from outside: retryable) | Cancelled (deleted on purpose: never retried)
    exit_code: int
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.state == SUCCEEDED


@runtime_checkable
class Launcher(Protocol):
    kind: str

    def submit(self, spec: JobSpec) -> JobHandle: ...

    def wait(self, handle: JobHandle, timeout_s: float | None = None) -> JobOutcome: ...

    def logs(self, handle: JobHandle) -> str: ...

    def cancel(self, handle: JobHandle) -> None: ...

    def record(self, handle: JobHandle) -> dict[str, Any]:
        """Where a finished job ran, for the version it produced (empty when there is nothing beyond the
        lineage record to say)."""
        ...


def run_to_end(launcher: Launcher, spec: JobSpec, timeout_s: float | None = None) -> JobOutcome:
    """Submit and wait; Ctrl-C cancels the job (the local launcher forwards it to its processes itself)."""
    handle = launcher.submit(spec)
    try:
        return launcher.wait(handle, timeout_s)
    except KeyboardInterrupt:
        launcher.cancel(handle)
        raise
