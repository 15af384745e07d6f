"""A deployment follows a registry alias: what `champion` names is what the robots get, within one poll.

Every `poll_s` seconds the alias is read through the registry's audit (an alias moved outside the platform, by
hand in the MLflow UI, is not followed: a promotion without a passing verdict must not reach a robot). When it
names another version, that version is fetched (its export hash checked), loaded, refused if it is not a policy
for this deployment's robots, warmed up on a probe input, and only then swapped in: one reference assignment, so
a request that has already taken the old version finishes on it and the next one gets the new. A version that is
refused or fails warm-up is reported (log, `motus_serve_refused_versions`, `/metadata`'s `last_refusal`) and not
tried again until the alias moves elsewhere; the old version keeps serving. A rollback is just the alias moving
back: the previous version's export is still in the cache folder, so it swaps back without a download.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import ServerMetrics
from .served import Expectation, LoadRefused, ServedVersion, WarmUpFailed

log = logging.getLogger(__name__)

_TARGET = re.compile(r"^(?:models:/)?(?P<name>[^/@\s]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class Target:
    """What a deployment serves: `NAME@ALIAS` (followed), `NAME/VERSION` (pinned), or an export folder."""

    name: str | None
    alias: str | None = None
    version: int | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        if Path(text).is_dir():
            return cls(None, path=Path(text))
        m = _TARGET.match(text.strip())
        if not m:
            raise ValueError(f"'{text}' is neither MODEL@ALIAS, MODEL/VERSION (optionally models:/...) nor an "
                             "export folder")
        return cls(m["name"], alias=m["alias"], version=int(m["version"]) if m["version"] else None)

    @property
    def uri(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


@dataclass
class Event:
    at: float
    kind: str  # swap | refused | unverified | registry-error
    version: int | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)), "kind": self.kind,
                "version": self.version, "detail": self.detail}


@dataclass
class Deployment:
    target: Target
    registry: Any = None  # motus.track.registry.Registry; None for an export folder
    cache_dir: Path = Path(".motus-serve")
    device: str = "cpu"
    precision: str | None = None  # auto | bf16 | fp32 (ServedVersion.load)
    expect: Expectation = field(default_factory=Expectation)
    poll_s: float = 5.0
    metrics: ServerMetrics = field(default_factory=ServerMetrics)

    def __post_init__(self) -> None:
        self.current: ServedVersion | None = None  # read without a lock: one reference, swapped whole
        self.events: list[Event] = []
        self._refused: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()
        if self.target.path is None and self.registry is None:
            raise ValueError(f"serving {self.target.uri} needs a registry (MOTUS_TRACKING_URI)")

    # -- following ------------------------------------------------------------------------------------------
    def refresh(self) -> str:
        """One poll: swap in what the target names now, if it is new and sane. Says what happened."""
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> str:
        if self.target.path is not None:
            if self.current is None:
                return self._try(None, lambda: ServedVersion.load(self.target.path, device=self.device,
                                                                  precision=self.precision, expect=self.expect))
            return "unchanged"
        from ..track.registry import RegistryError, UnverifiedAlias

        try:
            ref = self.registry.resolve(self.target.uri)
        except UnverifiedAlias as e:
            self.metrics.registry_errors.labels(kind="unverified").inc()
            return self._note("unverified", None, str(e), logging.ERROR)
        except RegistryError as e:
            self.metrics.registry_errors.labels(kind="not-found").inc()
            return self._note("registry-error", None, str(e), logging.WARNING)
        except Exception as e:  # noqa: BLE001 - the registry being down must not stop the serving
            self.metrics.registry_errors.labels(kind="unreachable").inc()
            return self._note("registry-error", None, f"{type(e).__name__}: {e}", logging.WARNING)
        if ref is None:
            return self._note("registry-error", None, f"{self.target.uri} names no version", logging.WARNING)
        if self.current is not None and self.current.version == ref.version:
            return "unchanged"
        if ref.version in self._refused:
            return f"v{ref.version} stays refused: {self._refused[ref.version]}"
        digest = ref.tags.get("motus.export_hash")
        return self._try(ref.version, lambda: ServedVersion.load(
            self._fetch(ref, digest), name=ref.name, version=ref.version, export_hash=digest, device=self.device,
            precision=self.precision, expect=self.expect))

    def _fetch(self, ref: Any, digest: str | None) -> Path:
        """The version's export in the cache folder (downloaded once per export hash, checked by the registry)."""
        folder = self.cache_dir / f"{ref.name}-v{ref.version}-{(digest or 'unhashed')[:12]}"
        done = folder / ".complete"
        if done.is_file():
            return Path(done.read_text().strip())
        shutil.rmtree(folder, ignore_errors=True)
        local = self.registry.fetch(ref, folder)
        done.write_text(str(local))
        return local

    def _try(self, version: int | None, load: Any) -> str:
        try:
            served = load()
            served.warm_up()
        except (LoadRefused, WarmUpFailed) as e:
            reason = "warm-up" if isinstance(e, WarmUpFailed) else "refused"
            return self._refuse(version, reason, str(e))
        except Exception as e:  # noqa: BLE001 - a download or load that breaks is a refusal, not a crash
            return self._refuse(version, "load-error", f"{type(e).__name__}: {e}")
        old, self.current = self.current, served
        self._refused.clear()  # the alias moved on: a version refused before is tried again if it comes back
        self.metrics.now_serving(served.name, str(served.version))
        self.metrics.swaps.inc()
        was = f" (was {old.label})" if old is not None else ""
        return self._note("swap", version, f"serving {served.label}{was}; warm-up {served.warm_up_s:.2f}s",
                          logging.INFO)

    def _refuse(self, version: int | None, reason: str, detail: str) -> str:
        if version is not None:
            self._refused[version] = detail
        self.metrics.refused.labels(reason=reason).inc()
        keep = f"; still serving {self.current.label}" if self.current is not None else ""
        return self._note("refused", version, detail + keep, logging.ERROR)

    def _note(self, kind: str, version: int | None, detail: str, level: int) -> str:
        self.events.append(Event(time.time(), kind, version, detail))
        del self.events[:-50]
        log.log(level, "%s: %s", self.target.uri, detail)
        return detail

    def start(self) -> None:
        """Poll in the background until `stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="motus-serve-follow", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.target.alias is None and self.current is not None:
                continue  # pinned: nothing moves
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the loop outlives any one poll
                log.exception("%s: polling the alias failed", self.target.uri)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- reporting ------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        last = next((e for e in reversed(self.events) if e.kind == "refused"), None)
        out = {"target": self.target.uri, "following": self.target.alias, "poll_seconds": self.poll_s,
               "serving": self.current.metadata() if self.current is not None else None,
               "last_refusal": last.to_json() if last is not None else None,
               "events": [e.to_json() for e in self.events[-10:]]}
        return out
