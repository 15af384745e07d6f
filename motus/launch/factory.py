"""The one place that turns `MOTUS_LAUNCHER` into a launcher (see `motus.launch.launcher` for the protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .launcher import Launcher


def launcher_for(settings: Any, *, log: Path | None = None, **cluster: Any) -> Launcher:
    """The launcher `settings.launcher` names (MOTUS_LAUNCHER). `log`: where the local launcher writes the
    job's output (None: this terminal); `cluster`: kubeconfig / context / namespace for the kubernetes one."""
    if settings.launcher == "local":
        from .local import LocalLauncher
        from .runner import Runners

        return LocalLauncher(log=log, runners=Runners.from_settings(settings))
    if settings.launcher == "kubernetes":
        from .kubernetes import KubernetesLauncher

        return KubernetesLauncher.from_settings(settings, **cluster)
    raise ValueError(f"MOTUS_LAUNCHER={settings.launcher!r}: expected local or kubernetes")
