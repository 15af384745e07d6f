"""The model registry: stage exports become versions, gates judge them, `champion` moves only by verdict.

Registered models: `motus-vgm` (Stage 1), `motus-latent-action` (Stage 2), the Stage 3 model named in
params.yaml (e.g. `motus-aloha`) and `motus-lam` (the latent-action VAE). The name comes from the export's
lineage record (`motus.contracts.LineageRecord`), so the registry needs no list of its own.

A version is registered from a stage job's `export/` folder: the folder is uploaded as the artifacts `model/`
of the job's own MLflow run (so the version's source lives beside the run that made it) and the version is
tagged with everything lineage needs (`motus.*`): stage, tiers and their hashes, config hash, code commit,
checkpoint hash, export hash, parent version, device hours and cost (own and cumulative). The parent version
is found by content, not by path: the parent export's hash is matched against `motus.export_hash` of the
registered versions, so a parent fetched from the registry into a temporary folder still links.
Registration is idempotent: an export already registered (same export hash) returns the existing version.

Aliases: `candidate` moves on every registration; `champion` moves only through `promote` (a passing verdict
for that exact version, judged against the champion that is still the champion, under the same gate policy
and evaluation run) or `rollback` (back to the champion before). Every alias move is appended to an audit
trail kept as registered-model tags `motus.audit.NNNNNN` (JSON: seq, at, action, alias, from, to, actor).

Concurrency. Alias moves and registrations happen under a per-model mutex that works on any MLflow store,
SQLite or a REST server alike, because it uses only what every store makes atomic: creating a registered
model fails when one with that name exists. The lock is the registered model `<name>.lock` (tags: owner,
acquired_at); releasing it deletes it. A holder that died leaves it behind, so a lock older than `lock_ttl`
seconds is broken (deleted) by the next contender, with a warning. Inside the lock, `promote` re-reads the
champion and refuses when it differs from the one the verdict was judged against: of two promotions racing
on verdicts judged against the same champion, the first to take the lock wins and the other is refused
("the champion moved"). The TTL must exceed the longest critical section (milliseconds to seconds); a
contender waits up to `lock_wait` seconds. Known limit: two contenders breaking the same stale lock at the
same instant can both believe they hold it for one critical section; stale locks only exist after a crash.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..contracts import ContractError, FeatureManifest, LineageRecord
from .evaluations import EVALUATION_RUN_TAG
from .gates import GateError, Verdict, gate_hash, judge
from .lineage import export_hash, locate, read_export_lineage
from .tags import T, lineage_tags
from .tracker import resolve_tracking_uri

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
LOCK_SUFFIX = ".lock"
AUDIT_PREFIX = "motus.audit."
VERDICT_TAG = "motus.verdict"
VERDICT_JSON_TAG = "motus.verdict.json"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


class RegistryError(Exception):
    """Bad input or state: the message names the model, version, file or store."""


class PromotionRefused(RegistryError):
    """A promotion the gate does not allow; the message names the rule or reason."""


class LockTimeout(RegistryError):
    """The per-model registry lock stayed taken for longer than `lock_wait`."""


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _code(e: MlflowException) -> str:
    return str(getattr(e, "error_code", ""))


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class Registry:
    """The registry of one MLflow store (`tracking_uri`, default: settings' MOTUS_TRACKING_URI), judged by the
    gates and priced by the costs of `params` (needed for evaluate/promote; lineage queries work without)."""

    def __init__(self, tracking_uri: str | None = None, params: Any = None, *, lock_ttl: float = 60.0,
                 lock_wait: float = 30.0):
        if tracking_uri is None:
            from ..config import get_settings

            tracking_uri = get_settings().tracking_uri
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._params = params
        self.lock_ttl, self.lock_wait = lock_ttl, lock_wait

    # ------------------------------------------------------------------------------------ config

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

    # ------------------------------------------------------------------------------------ reading

    def _ref(self, mv: Any) -> ModelVersionRef:
        return ModelVersionRef(mv.name, int(mv.version), mv.run_id or None, mv.source, dict(mv.tags or {}))

    def _registered(self, name: str) -> Any:
        try:
            return self.client.get_registered_model(name)
        except MlflowException as e:
            if _code(e) == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"no registered model '{name}' in {self.tracking_uri}") from None
            raise

    def version(self, name: str, version: int | str) -> ModelVersionRef:
        try:
            int(version)
        except (TypeError, ValueError):
            raise RegistryError(f"model version must be a number, got {version!r} for '{name}'") from None
        self._registered(name)
        try:
            return self._ref(self.client.get_model_version(name, str(int(version))))
        except MlflowException as e:
            if _code(e) == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"'{name}' has no version {version} in {self.tracking_uri}") from None
            raise

    def aliases(self, name: str) -> dict[str, int]:
        return {a: int(v) for a, v in (self._registered(name).aliases or {}).items()}

    def champion(self, name: str) -> ModelVersionRef | None:
        v = self.aliases(name).get(CHAMPION)
        return None if v is None else self.version(name, v)

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
        out = []
        for rm in self.client.search_registered_models(max_results=1000):
            if not rm.name.endswith(LOCK_SUFFIX):
                out.append(rm)
        return sorted(out, key=lambda rm: rm.name)

    def versions(self, name: str | None = None, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None) -> list[ModelVersionRef]:
        """Versions (of `name`, or of every model; of `run_id`) whose tags equal `tags` (`x%` is a prefix)."""
        clauses = [f"name = {_quote(name)}"] if name else []
        clauses += [f"run_id = {_quote(run_id)}"] if run_id else []
        for k, v in (tags or {}).items():
            op = "LIKE" if v.endswith("%") else "="
            clauses.append(f"tags.`{k}` {op} {_quote(v)}")
        refs: list[ModelVersionRef] = []
        token = None
        while True:
            page = self.client.search_model_versions(" and ".join(clauses) or None, max_results=1000,
                                                     page_token=token)
            refs += [self._ref(mv) for mv in page]
            token = page.token
            if not token:
                break
        return sorted(refs, key=lambda r: (r.name, r.version))

    def fetch(self, uri_or_ref: str | ModelVersionRef, dst: Path | None = None) -> Path:
        """The version's export, downloaded to `dst` (default: a new temporary folder); its hash is checked."""
        ref = self.resolve(uri_or_ref) if isinstance(uri_or_ref, str) else uri_or_ref
        if not ref.run_id:
            raise RegistryError(f"{ref} has no run to download its model from")
        dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"motus-{ref.name}-v{ref.version}-"))
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(self.client.download_artifacts(ref.run_id, "model", str(dst)))
        want = ref.tags.get(f"{T}export_hash")
        if want and export_hash(local) != want:
            raise RegistryError(f"{ref}: downloaded export in {local} does not match its registered hash "
                                f"{want[:12]} (artifacts of run {ref.run_id} were changed)")
        return local

    # ------------------------------------------------------------------------------------ lock + audit

    @contextlib.contextmanager
    def lock(self, name: str, owner: str | None = None) -> Iterator[None]:
        """The cross-process mutex of model `name` (see the module docstring)."""
        lock_name = name + LOCK_SUFFIX
        owner = f"{owner or default_actor()}#{secrets.token_hex(4)}"
        deadline = time.monotonic() + self.lock_wait
        delay = 0.02
        while True:
            try:
                self.client.create_registered_model(
                    lock_name, tags={"motus.lock.owner": owner, "motus.lock.acquired_at": f"{time.time():.3f}"},
                    description=f"registry lock of {name}; deleted on release")
                break
            except MlflowException as e:
                if _code(e) != "RESOURCE_ALREADY_EXISTS":
                    raise
            self._break_if_stale(lock_name)
            if time.monotonic() > deadline:
                raise LockTimeout(f"registry lock '{lock_name}' is still taken after {self.lock_wait:.0f}s "
                                  f"(it is broken automatically when older than {self.lock_ttl:.0f}s)")
            time.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, 0.5)
        try:
            yield
        finally:
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(lock_name)

    def _break_if_stale(self, lock_name: str) -> None:
        try:
            rm = self.client.get_registered_model(lock_name)
        except MlflowException:
            return  # released in between
        tags = dict(rm.tags or {})
        try:
            age = time.time() - float(tags.get("motus.lock.acquired_at", "0"))
        except ValueError:
            age = float("inf")
        if age > self.lock_ttl:
            log.warning("breaking stale registry lock %s held by %s for %.0fs", lock_name,
                        tags.get("motus.lock.owner", "?"), age)
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(lock_name)

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of `name`, oldest first."""
        tags = self._registered(name).tags or {}
        entries = [json.loads(v) for k, v in tags.items() if k.startswith(AUDIT_PREFIX)]
        return sorted(entries, key=lambda e: e["seq"])

    def _audit(self, name: str, action: str, alias: str, old: int | None, new: int | None, actor: str,
               **extra: Any) -> dict[str, Any]:
        """Append one entry; callers hold the model's lock, so sequence numbers never collide."""
        seq = max((e["seq"] for e in self.history(name)), default=0) + 1
        entry = {"seq": seq, "at": _now(), "action": action, "alias": alias, "from": old, "to": new,
                 "actor": actor, **extra}
        self.client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{seq:06d}", json.dumps(entry, sort_keys=True))
        return entry

    def _move_alias(self, name: str, alias: str, version: int, action: str, actor: str, **extra: Any) -> None:
        old = self.aliases(name).get(alias)
        self.client.set_registered_model_alias(name, alias, str(version))
        self._audit(name, action, alias, old, version, actor, **extra)

    # ------------------------------------------------------------------------------------ register

    def _ensure_model(self, name: str, description: str) -> None:
        try:
            self.client.create_registered_model(name, description=description)
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise

    def register(self, export_dir: Path, actor: str | None = None) -> ModelVersionRef:
        """A stage (or latent-action) export -> a new version of its registered model, alias `candidate`.

        `export_dir` may also be the job's run folder (its `export/` is used). Idempotent per export content.
        """
        try:
            export, lineage = read_export_lineage(Path(export_dir))
        except ContractError as e:
            raise RegistryError(str(e)) from None
        name = lineage.registered_model
        run_id = lineage.run_id
        if not run_id:
            raise RegistryError(f"{export}: the job ran without tracking (its lineage record has no run id), so "
                                "there is no run to link the version to; rerun it with tracking on")
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise RegistryError(f"{export}: its run {run_id} is not in the tracking store {self.tracking_uri} "
                                "(was it trained against another MOTUS_TRACKING_URI?)") from None
        digest = export_hash(export)
        self._ensure_model(name, f"Motus {lineage.label} exports (motus registry)")
        actor = actor or default_actor()
        with self.lock(name):
            existing = self.versions(name, {f"{T}export_hash": digest})
            if existing:
                return existing[0]
            tags = self._version_tags(export, lineage, run, digest)
            self.client.log_artifacts(run_id, str(export), "model")
            mv = self.client.create_model_version(name, source=f"{run.info.artifact_uri.rstrip('/')}/model",
                                                  run_id=run_id, tags=tags,
                                                  description=f"{tags[T + 'stage']} export of run {run_id}")
            version = int(mv.version)
            self._move_alias(name, CANDIDATE, version, "register", actor)
            return self.version(name, version)

    def _version_tags(self, export: Path, lineage: LineageRecord, run: Any, digest: str) -> dict[str, str]:
        rtags, metrics = run.data.tags, run.data.metrics
        known = getattr(self.params, "tiers", {}) if self._params is not None else {}
        # schema-0 latent-action records carry no tier level: params.yaml knows it
        tiers = tuple(t if t.level is not None or t.name not in known else replace(t, level=known[t.name].level)
                      for t in lineage.tiers)
        tags = lineage_tags(replace(lineage, tiers=tiers), run_tags=rtags)
        tags.update({f"{T}export_hash": digest, f"{T}export_path": str(export.resolve())})
        # checkpoint: its manifest's content hash, from the folder or from the run's copy of the manifest
        ckpt = lineage.checkpoint
        if ckpt:
            tags[f"{T}checkpoint_path"] = str(ckpt)
            tags[f"{T}checkpoint_hash"] = self._checkpoint_hash(ckpt, export, run.info.run_id) or ""
        # parents: the model this job started from, and (Stage 2) the latent-action model behind its features
        parents = []
        parent = lineage.parent
        if parent:
            tags[f"{T}parent_path"] = str(parent)
            ref, phash = self._parent_version(parent, export)
            tags[f"{T}parent_hash"] = phash or ""
            tags[f"{T}parent_version"] = f"{ref.name}/{ref.version}" if ref else ""
            parents += [ref] if ref else []
        lam_hashes = self._latent_action_inputs(run)
        for i, (feature, lam_hash) in enumerate(sorted(lam_hashes.items())):
            tags[f"{T}feature.{feature}"] = lam_hash["feature_hash"]
            if i == 0 and lam_hash["model_hash"]:
                lam = self.versions(None, {f"{T}export_hash": lam_hash["model_hash"]})
                tags[f"{T}lam_hash"] = lam_hash["model_hash"]
                tags[f"{T}lam_version"] = f"{lam[0].name}/{lam[0].version}" if lam else ""
                parents += lam[:1]
        # device hours and cost: own, and cumulative along every registered ancestor
        hours = float(lineage.device_hours or metrics.get("cost/device_hours") or 0.0)
        amount = metrics.get("cost/amount")
        if amount is None:
            price = self.params.costs.device_hour.get(tags[f"{T}device_type"]) if self._params is not None else None
            amount = hours * price if price is not None else None
        tags[f"{T}device_hours"] = f"{hours:.9g}"
        tags[f"{T}cost"] = "" if amount is None else f"{float(amount):.9g}"
        total_h, total_c = hours, (float(amount) if amount is not None else None)
        for p in parents:
            total_h += float(p.tags.get(f"{T}device_hours_total") or 0.0)
            pc = p.tags.get(f"{T}cost_total", "")
            total_c = None if (total_c is None or pc == "") else total_c + float(pc)
        tags[f"{T}device_hours_total"] = f"{total_h:.9g}"
        tags[f"{T}cost_total"] = "" if total_c is None else f"{total_c:.9g}"
        tags[f"{T}currency"] = rtags.get("currency", "")
        return tags

    def _checkpoint_hash(self, ckpt: str, export: Path, run_id: str) -> str | None:
        path = locate(ckpt, export)
        text = None
        if path is not None and (path / "manifest.json").is_file():
            text = (path / "manifest.json").read_text()
        else:
            with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp:
                text = Path(self.client.download_artifacts(run_id, "checkpoint/manifest.json", tmp)).read_text()
        return json.loads(text).get("content_hash") if text else None

    def _parent_version(self, parent: str, export: Path) -> tuple[ModelVersionRef | None, str | None]:
        """The registered version a job started from: by URI, else by the parent export's content hash."""
        if parent.startswith("models:/"):
            ref = self.resolve(parent)
            return ref, ref.tags.get(f"{T}export_hash")
        path = locate(parent, export)
        if path is None or not path.is_dir():
            # the folder is gone: the path recorded at registration still finds it
            by_path = self.versions(None, {f"{T}export_path": str(Path(parent).resolve())})
            return (by_path[0], by_path[0].tags.get(f"{T}export_hash")) if by_path else (None, None)
        digest = export_hash(path)
        found = self.versions(None, {f"{T}export_hash": digest})
        return (found[0] if found else None), digest

    def _latent_action_inputs(self, run: Any) -> dict[str, dict[str, str | None]]:
        """Stage 2's latent-action features (run dataset inputs `latent_actions/<tier>`) and the VAE behind them."""
        out: dict[str, dict[str, str | None]] = {}
        for d in run.inputs.dataset_inputs if run.inputs else []:
            if not d.dataset.name.startswith("latent_actions/"):
                continue
            model_hash = None
            with contextlib.suppress(Exception):
                src = json.loads(d.dataset.source)
                where = src.get("uri") or src.get("path") or ""
                folder = Path(where.removeprefix("file://"))
                meta = FeatureManifest.read(folder).meta
                model_hash = meta.get("latent_action_model_hash")
            profile = {}
            with contextlib.suppress(Exception):
                profile = json.loads(d.dataset.profile or "{}")
            out[d.dataset.name] = {"feature_hash": profile.get("digest", d.dataset.digest), "model_hash": model_hash}
        return out

    # ------------------------------------------------------------------------------------ gates

    def metrics(self, ref: ModelVersionRef) -> dict[str, float]:
        """Latest value of every metric: the evaluation run's (tag motus.evaluation_run) over the training run's."""
        out: dict[str, float] = {}
        for run_id in (ref.run_id, ref.tags.get(EVALUATION_RUN_TAG)):
            if not run_id:
                continue
            try:
                out.update(self.client.get_run(run_id).data.metrics)
            except MlflowException:
                raise RegistryError(f"{ref}: run {run_id} is not in {self.tracking_uri}") from None
        return out

    def evaluate(self, name: str, version: int | str, actor: str | None = None) -> Verdict:
        """Judge the version against its gate and the current champion; record the verdict on the version."""
        ref = self.version(name, version)
        gate = self.gate(name)
        champ = self.champion(name)
        run_tags: dict[str, str] = {}
        if ref.run_id:
            run_tags = dict(self.client.get_run(ref.run_id).data.tags)
        verdict = judge(name, ref.version, gate, self.metrics(ref), self.metrics(champ) if champ else None,
                        champ.version if champ else None, {**run_tags, **ref.tags},
                        evaluation_run=ref.tags.get(EVALUATION_RUN_TAG), training_run=ref.run_id,
                        actor=actor or default_actor())
        self._record(ref, verdict)
        return verdict

    def _record(self, ref: ModelVersionRef, verdict: Verdict) -> None:
        v = str(ref.version)
        for k in [k for k in ref.tags if k.startswith(VERDICT_TAG + ".rule.")]:
            self.client.delete_model_version_tag(ref.name, v, k)  # a re-evaluation replaces the last verdict
        tags = {VERDICT_TAG: "pass" if verdict.passed else "fail", f"{VERDICT_TAG}.at": verdict.judged_at,
                f"{VERDICT_TAG}.champion": "" if verdict.champion_version is None else str(verdict.champion_version),
                VERDICT_JSON_TAG: verdict.to_json()}
        for i, r in enumerate(verdict.rules):
            tags[f"{VERDICT_TAG}.rule.{i}.{r.metric}"] = f"{'pass' if r.passed else 'fail'}: {r.reason}"
        if ref.run_id:
            stamp = verdict.judged_at.replace(":", "").replace("-", "")
            artifact = f"registry/verdicts/{ref.name}-v{ref.version}-{stamp}.json"
            with tempfile.TemporaryDirectory() as tmp:
                f = Path(tmp) / Path(artifact).name
                f.write_text(json.dumps(json.loads(verdict.to_json()), indent=2) + "\n")
                self.client.log_artifact(ref.run_id, str(f), str(Path(artifact).parent))
            tags[f"{VERDICT_TAG}.artifact"] = artifact
        for k, val in tags.items():
            self.client.set_model_version_tag(ref.name, v, k, val)

    def verdict(self, name: str, version: int | str) -> Verdict | None:
        text = self.version(name, version).tags.get(VERDICT_JSON_TAG)
        return Verdict.from_json(text) if text else None

    # ------------------------------------------------------------------------------------ champion

    def promote(self, name: str, version: int | str, actor: str | None = None) -> None:
        """Move `champion` to this version; PromotionRefused (naming the rule or reason) unless its verdict allows."""
        actor = actor or default_actor()
        ref = self.version(name, version)
        with self.lock(name, actor):
            ref = self.version(name, version)  # tags as they are now, inside the lock
            text = ref.tags.get(VERDICT_JSON_TAG)
            if not text:
                raise PromotionRefused(f"{ref} has no verdict: run `motus registry evaluate {name} {ref.version}` "
                                       "first")
            verdict = Verdict.from_json(text)
            if verdict.name != name or verdict.version != ref.version:
                raise PromotionRefused(f"{ref}: its verdict is for {verdict.name} v{verdict.version}")
            if not verdict.passed:
                failed = "; ".join(f"{r.label}: {r.reason}" for r in verdict.failed_rules)
                raise PromotionRefused(f"{ref} failed its gate: {failed}")
            current = self.aliases(name).get(CHAMPION)
            if current == ref.version:
                return
            if current != verdict.champion_version:
                judged = "no champion" if verdict.champion_version is None else f"champion v{verdict.champion_version}"
                raise PromotionRefused(f"{ref}: the champion moved since its verdict (judged against {judged}, "
                                       f"the champion is now v{current}); evaluate it again")
            if verdict.gate_hash != gate_hash(self.gate(name)):
                raise PromotionRefused(f"{ref}: the gate of '{name}' in params.yaml changed since its verdict; "
                                       "evaluate it again")
            if verdict.evaluation_run != ref.tags.get(EVALUATION_RUN_TAG):
                raise PromotionRefused(f"{ref}: its evaluation run changed since its verdict; evaluate it again")
            self._move_alias(name, CHAMPION, ref.version, "promote", actor, verdict_at=verdict.judged_at)

    def _champion_stack(self, name: str) -> list[int]:
        """Champions in order, as promotions pushed them and rollbacks popped them."""
        stack: list[int] = []
        for e in self.history(name):
            if e.get("alias") != CHAMPION:
                continue
            if e["action"] == "rollback" and stack:
                stack.pop()
            elif e["action"] == "promote":
                stack.append(int(e["to"]))
        return stack

    def rollback(self, name: str, actor: str | None = None) -> ModelVersionRef:
        """Give `champion` back to the champion before the current one; returns it."""
        actor = actor or default_actor()
        self._registered(name)
        with self.lock(name, actor):
            current = self.aliases(name).get(CHAMPION)
            if current is None:
                raise RegistryError(f"'{name}' has no champion to roll back")
            stack = self._champion_stack(name)
            if len(stack) < 2 or stack[-1] != current:
                raise RegistryError(f"'{name}': no previous champion recorded before v{current}")
            previous = self.version(name, stack[-2])
            self._move_alias(name, CHAMPION, previous.version, "rollback", actor)
            return previous
