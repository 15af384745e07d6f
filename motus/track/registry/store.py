"""Reading the registry: one MLflow store's registered models, versions and aliases, as `ModelVersionRef`s.

The other registry modules (lock, versions, verdicts, champion) write through a `Store`; none of them opens a
client of its own, so one registry is one store and one set of error messages naming it.
"""

from __future__ import annotations

import getpass
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..tracker import check_reachable, resolve_tracking_uri

LOCK_SUFFIX = ".lock"
CANDIDATE, CHAMPION = "candidate", "champion"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


class RegistryError(Exception):
    """A registry operation that cannot be done; the message names the model, version or store."""


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: int
    run_id: str | None
    source: str
    tags: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def error_code(e: MlflowException) -> str:
    return str(getattr(e, "error_code", ""))


def quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class Store:
    """One MLflow store (tracking and registry at the same URI), read as registered models and versions."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        check_reachable(self.tracking_uri)  # one line naming a store that does not answer, not minutes of retries
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def ref(self, mv: Any) -> ModelVersionRef:
        return ModelVersionRef(mv.name, int(mv.version), mv.run_id or None, mv.source, dict(mv.tags or {}))

    def registered(self, name: str) -> Any:
        try:
            return self.client.get_registered_model(name)
        except MlflowException as e:
            if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"no registered model '{name}' in {self.tracking_uri}") from None
            raise

    def ensure_model(self, name: str, description: str) -> None:
        try:
            self.client.create_registered_model(name, description=description)
        except MlflowException as e:
            if error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise

    def version(self, name: str, version: int | str) -> ModelVersionRef:
        try:
            int(version)
        except (TypeError, ValueError):
            raise RegistryError(f"model version must be a number, got {version!r} for '{name}'") from None
        self.registered(name)
        try:
            return self.ref(self.client.get_model_version(name, str(int(version))))
        except MlflowException as e:
            if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"'{name}' has no version {version} in {self.tracking_uri}") from None
            raise

    def aliases(self, name: str) -> dict[str, int]:
        return {a: int(v) for a, v in (self.registered(name).aliases or {}).items()}

    def resolve(self, uri: str) -> ModelVersionRef:
        """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> the version."""
        m = _MODELS_URI.match(uri.strip())
        if not m:
            raise RegistryError(f"'{uri}' is not a model URI (models:/NAME/VERSION or models:/NAME@ALIAS)")
        name = m["name"]
        if m["version"]:
            return self.version(name, m["version"])
        aliases = self.aliases(name)
        if m["alias"] not in aliases:
            raise RegistryError(f"'{name}' has no alias '{m['alias']}' (aliases: "
                                f"{', '.join(f'{a}=v{v}' for a, v in sorted(aliases.items())) or 'none'})")
        return self.version(name, aliases[m["alias"]])

    def models(self) -> list[Any]:
        """Registered models, lock entries left out."""
        out = [rm for rm in self.client.search_registered_models(max_results=1000)
               if not rm.name.endswith(LOCK_SUFFIX)]
        return sorted(out, key=lambda rm: rm.name)

    def versions(self, name: str | None = None, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None) -> list[ModelVersionRef]:
        """Versions (of `name`, or of every model; of `run_id`) whose tags equal `tags` (`x%` is a prefix)."""
        clauses = [f"name = {quote(name)}"] if name else []
        clauses += [f"run_id = {quote(run_id)}"] if run_id else []
        for k, v in (tags or {}).items():
            op = "LIKE" if v.endswith("%") else "="
            clauses.append(f"tags.`{k}` {op} {quote(v)}")
        return self.search(" and ".join(clauses) or None)

    def search(self, filter_string: str | None, page_size: int = 1000) -> list[ModelVersionRef]:
        """Every version an MLflow filter matches (all pages), sorted by (name, version). `page_size` up to the
        server's limit (200,000) makes a scan of the whole store one request."""
        refs: list[ModelVersionRef] = []
        token = None
        while True:
            page = self.client.search_model_versions(filter_string, max_results=page_size, page_token=token)
            refs += [self.ref(mv) for mv in page]
            token = page.token
            if not token:
                break
        return sorted(refs, key=lambda r: (r.name, r.version))
