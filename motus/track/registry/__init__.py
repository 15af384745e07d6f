"""The model registry: stage exports become versions, gates judge them, `champion` moves only by verdict.

Registered models: `motus-vgm` (Stage 1), `motus-latent-action` (Stage 2), the Stage 3 model named in
params.yaml (e.g. `motus-aloha`) and `motus-lam` (the latent-action VAE). The name comes from the export's
lineage record (`motus.contracts.LineageRecord`), so the registry needs no list of its own.

Four parts, each a module of this package, over one MLflow store (`store.py`, reading):
- `lock.py`: the per-model mutex alias moves and registrations run under (works on SQLite and REST stores).
- `versions.py`: register an export (tags for lineage, cost from the prices given), fetch one back.
- `verdicts.py`: judge a version under a gate against the champion, record the verdict on it.
- `champion.py`: the aliases, `promote` (only on the version's own passing, still-current verdict),
  `rollback`, the audit trail of every move, and the check of every alias against it (an alias moved outside
  the platform is unverified: never handed to a gate or a pipeline, flagged, repaired on request).
`Registry` is the one object the CLI, the pipeline and the evaluation use: it owns the project's params and
hands each part the gate, prices and tier levels it needs as arguments; the parts read no configuration.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..gates import GateError, Verdict
from .champion import AUDIT_PREFIX, AliasState, Champion, PromotionRefused, UnverifiedAlias
from .lock import LockTimeout, ModelLock
from .store import CANDIDATE, CHAMPION, LOCK_SUFFIX, ModelVersionRef, RegistryError, Store, default_actor
from .verdicts import VERDICT_JSON_TAG, VERDICT_TAG, Verdicts
from .versions import Versions

__all__ = ["AUDIT_PREFIX", "CANDIDATE", "CHAMPION", "LOCK_SUFFIX", "VERDICT_JSON_TAG", "VERDICT_TAG", "AliasState",
           "LockTimeout", "ModelVersionRef", "PromotionRefused", "Registry", "RegistryError", "UnverifiedAlias",
           "default_actor"]


class Registry:
    """The registry of one MLflow store (`tracking_uri`, default: settings' MOTUS_TRACKING_URI), judged by the
    gates and priced by the costs of `params` (needed for evaluate/promote; lineage queries work without)."""

    def __init__(self, tracking_uri: str | None = None, params: Any = None, *, lock_ttl: float = 15.0,
                 lock_wait: float = 60.0):
        if tracking_uri is None:
            from ...config import get_settings

            tracking_uri = get_settings().tracking_uri
        self.store = Store(tracking_uri)
        self.tracking_uri, self.client = self.store.tracking_uri, self.store.client
        self._params = params
        self._lock = ModelLock(self.store, ttl=lock_ttl, wait=lock_wait)
        self.champions = Champion(self.store, self._lock)
        self.verdicts = Verdicts(self.store)
        self._versions = Versions(self.store, self._lock, self.champions)

    # -- configuration: what the parts are given ----------------------------------------------------------
    @property
    def params(self) -> Any:
        """The params the registry was given (gates, prices, tiers); never read from the current folder, where a
        registry process may have nothing or another project's params.yaml."""
        if self._params is None:
            raise RegistryError("this registry was opened without params: gates and prices are unknown (pass "
                                "the project's params, e.g. Registry(uri, load_params(path)))")
        return self._params

    def gate(self, name: str) -> Any:
        gates = self.params.gates
        if name not in gates:
            raise GateError(f"no gate for model '{name}' in params.yaml gates (gated models: "
                            f"{', '.join(sorted(gates)) or 'none'}); promotion needs one")
        return gates[name]

    # -- reading -----------------------------------------------------------------------------------------
    def version(self, name: str, version: int | str) -> ModelVersionRef:
        return self.store.version(name, version)

    def aliases(self, name: str) -> dict[str, int]:
        return self.store.aliases(name)

    def champion(self, name: str) -> ModelVersionRef | None:
        """The champion as audited; UnverifiedAlias when the alias was moved outside the platform."""
        return self.champions.current(name)

    def alias_states(self, name: str) -> list[AliasState]:
        """Every alias of `name`, live against audited (`AliasState.verified`)."""
        return self.champions.states(name)

    def unverified(self, name: str | None = None) -> list[tuple[str, AliasState]]:
        """(model, alias state) for every alias of `name` (or of every model) that disagrees with its audit."""
        names = [name] if name else [m.name for m in self.models()]
        return [(n, s) for n in names for s in self.alias_states(n) if not s.verified]

    def resolve(self, uri: str) -> ModelVersionRef:
        """`models:/NAME/VERSION`, or `models:/NAME@ALIAS` when the alias is as audited (UnverifiedAlias if not)."""
        m = re.match(r"^models:/(?P<name>[^/@]+)@(?P<alias>[\w-]+)/?$", uri.strip())
        ref = self.champions.verified(m["name"], m["alias"]) if m else None
        return ref if ref is not None else self.store.resolve(uri)  # by version; an absent alias is named there

    def models(self) -> list[Any]:
        return self.store.models()

    def versions(self, name: str | None = None, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None) -> list[ModelVersionRef]:
        return self.store.versions(name, tags, run_id)

    def history(self, name: str) -> list[dict[str, Any]]:
        return self.champions.history(name)

    def verify(self, name: str | None = None) -> list[tuple[ModelVersionRef, str | None]]:
        """Every version of `name` (or of every model): its files downloaded and hashed against the export hash
        it was registered with. (version, None) when intact, (version, why) otherwise; nothing is changed."""
        import shutil
        import tempfile

        refs = self.versions(name) if name else [v for m in self.models() for v in self.versions(m.name)]
        out: list[tuple[ModelVersionRef, str | None]] = []
        for ref in sorted(refs, key=lambda r: (r.name, r.version)):
            tmp = Path(tempfile.mkdtemp(prefix=f"motus-verify-{ref.name}-v{ref.version}-"))
            try:
                self._versions.fetch(ref, tmp)
                out.append((ref, None if ref.tags.get("motus.export_hash") else "no export hash was recorded"))
            except Exception as e:  # noqa: BLE001 - a version that cannot be fetched is a finding, not a crash
                out.append((ref, str(e).splitlines()[0][:300]))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return out

    def metrics(self, ref: ModelVersionRef) -> dict[str, float]:
        return self.verdicts.metrics(ref)

    def verdict(self, name: str, version: int | str) -> Verdict | None:
        return self.verdicts.last(name, version)

    # -- writing -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, owner: str | None = None) -> Iterator[None]:
        """The cross-process mutex of model `name` (see lock.py)."""
        with self._lock(name, owner):
            yield

    def register(self, export_dir: Path, actor: str | None = None) -> ModelVersionRef:
        params = self._params
        return self._versions.register(
            export_dir, actor, prices=dict(params.costs.device_hour) if params is not None else {},
            tier_levels={n: t.level for n, t in params.tiers.items()} if params is not None else {})

    def tag_version(self, ref: ModelVersionRef, tags: dict[str, str]) -> None:
        """Add tags to a version (where its job ran); existing tags of other names are kept."""
        for k, v in tags.items():
            self.client.set_model_version_tag(ref.name, str(ref.version), k, v)

    def fetch(self, uri_or_ref: str | ModelVersionRef, dst: Path | None = None) -> Path:
        """The version's export, downloaded to `dst` (default: a new temporary folder); its hash is checked."""
        ref = self.resolve(uri_or_ref) if isinstance(uri_or_ref, str) else uri_or_ref
        return self._versions.fetch(ref, dst)

    def evaluate(self, name: str, version: int | str, actor: str | None = None) -> Verdict:
        """Judge the version against its gate and the current champion; record the verdict on the version."""
        ref = self.version(name, version)
        return self.verdicts.judge(ref, self.gate(name), self.champion(name), actor)

    def promote(self, name: str, version: int | str, actor: str | None = None) -> None:
        """Move `champion` to this version; PromotionRefused (naming the rule or reason) unless its verdict allows."""
        self.champions.promote(name, version, self.gate(name), actor)

    def rollback(self, name: str, actor: str | None = None) -> ModelVersionRef:
        """Give `champion` back to the champion before the current one; returns it."""
        return self.champions.rollback(name, actor)

    def repair(self, name: str, actor: str | None = None) -> list[dict[str, Any]]:
        """Every alias of `name` back to its audited state, each repair audited; the entries written."""
        return self.champions.repair(name, actor)
