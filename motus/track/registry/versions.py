"""Registering: a stage (or latent-action) export becomes a version of the model its lineage record names.

The export folder is uploaded as the artifacts `model/` of the job's own MLflow run (so the version's source
lives beside the run that made it) and the version is tagged with everything lineage needs (`motus.*`): stage,
tiers and their hashes, config hash, code commit, checkpoint hash, export hash, parent version, device hours
and cost (own and cumulative along the registered ancestors). The parent is found by content, not by path:
the parent export's hash is matched against `motus.export_hash` of the registered versions, so a parent
fetched from the registry into a temporary folder still links. Registration is idempotent: an export already
registered (same export hash) returns the existing version. Prices and tier levels are arguments.

Crash safety (each gap proven by a test that kills the process there, `crashpoints.py`): killed while
uploading, the rerun uploads again to the same content-named path (complete files replace partial ones) and
creates the one version; killed after creating the version but before `candidate` moved, the rerun finds the
version by its export hash and finishes the registration (moves `candidate`, audits it) unless a newer version
was registered since.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from ...contracts import MANIFEST_FILE, ContractError, FeatureManifest, LineageRecord
from ..lineage import export_hash, locate, read_export_lineage
from ..tags import T, lineage_tags, lineage_tier_tags
from .champion import Champion
from .crashpoints import crashpoint
from .flavour import write_pyfunc_files
from .lock import ModelLock
from .store import CANDIDATE, ModelVersionRef, RegistryError, Store, default_actor


class Versions:
    def __init__(self, store: Store, lock: ModelLock, aliases: Champion):
        self.store, self.lock, self.aliases = store, lock, aliases

    def register(self, export_dir: Path, actor: str | None = None, *, prices: Mapping[str, float] | None = None,
                 tier_levels: Mapping[str, int] | None = None) -> ModelVersionRef:
        """A stage (or latent-action) export -> a new version of its registered model, alias `candidate`.

        `export_dir` may also be the job's run folder (its `export/` is used). Idempotent per export content.
        `prices`: device type -> price per device hour (the version's cost); `tier_levels`: the project's tier
        levels, for records that do not carry them (schema-0 latent-action exports)."""
        client = self.store.client
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
            run = client.get_run(run_id)
        except MlflowException:
            raise RegistryError(f"{export}: its run {run_id} is not in the tracking store "
                                f"{self.store.tracking_uri} (was it trained against another "
                                "MOTUS_TRACKING_URI?)") from None
        digest = export_hash(export)
        self.store.ensure_model(name, f"Motus {lineage.label} exports (motus registry)")
        actor = actor or default_actor()
        with self.lock(name):
            existing = self.store.versions(name, {f"{T}export_hash": digest})
            if existing:
                self._finish_interrupted(existing[0], actor)
                return self.store.version(name, existing[0].version)
            tags = self._tags(export, lineage, run, digest, prices or {}, tier_levels or {})
            # each version's files at a path of their own, named by their content: a second export of the same
            # run (a rerun, another checkpoint) never overwrites the files an earlier version points at
            path = f"model-{digest[:16]}"
            tags[f"{T}artifact_path"] = path
            client.log_artifacts(run_id, str(export), path)
            with tempfile.TemporaryDirectory() as tmp:  # a policy or video model is an MLflow model (flavour.py)
                packaging = write_pyfunc_files(export, Path(tmp), run_id=run_id, export_hash=digest)
                for f in packaging:
                    client.log_artifact(run_id, str(f), path)
            tags[f"{T}flavour"] = "python_function" if packaging else ""
            crashpoint("registry.uploaded")
            mv = client.create_model_version(name, source=f"{run.info.artifact_uri.rstrip('/')}/{path}",
                                             run_id=run_id, tags=tags,
                                             description=f"{tags[T + 'stage']} export of run {run_id}")
            version = int(mv.version)
            crashpoint("registry.created")
            self.aliases.move_alias(name, CANDIDATE, version, "register", actor)
            return self.store.version(name, version)

    def _finish_interrupted(self, ref: ModelVersionRef, actor: str) -> None:
        """A version whose registration never reached its `register` audit entry (the process died after
        creating it): move `candidate` to it as registration would have, unless a newer version exists."""
        registered = any(e.get("action") == "register" and e.get("to") == ref.version
                         for e in self.aliases.history(ref.name))
        if registered:
            return
        newest = max(v.version for v in self.store.versions(ref.name))
        if newest == ref.version:
            self.aliases.move_alias(ref.name, CANDIDATE, ref.version, "register", actor, completed="after a crash")

    def fetch(self, ref: ModelVersionRef, dst: Path | None = None) -> Path:
        """The version's export, downloaded to `dst` (default: a new temporary folder); its hash is checked."""
        if not ref.run_id:
            raise RegistryError(f"{ref} has no run to download its model from")
        dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"motus-{ref.name}-v{ref.version}-"))
        dst.mkdir(parents=True, exist_ok=True)
        path = ref.tags.get(f"{T}artifact_path", "model")  # versions registered before per-version paths: model/
        local = Path(self.store.client.download_artifacts(ref.run_id, path, str(dst)))
        want = ref.tags.get(f"{T}export_hash")
        if want and export_hash(local) != want:
            raise RegistryError(f"{ref}: downloaded export in {local} does not match its registered hash "
                                f"{want[:12]} (artifacts of run {ref.run_id} were changed)")
        return local

    # -- the version's tags --------------------------------------------------------------------------------
    def _tags(self, export: Path, lineage: LineageRecord, run: Any, digest: str, prices: Mapping[str, float],
              tier_levels: Mapping[str, int]) -> dict[str, str]:
        rtags, metrics = run.data.tags, run.data.metrics
        tiers = tuple(t if t.level is not None or t.name not in tier_levels else replace(t, level=tier_levels[t.name])
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
                lam = self.store.versions(None, {f"{T}export_hash": lam_hash["model_hash"]})
                tags[f"{T}lam_hash"] = lam_hash["model_hash"]
                tags[f"{T}lam_version"] = f"{lam[0].name}/{lam[0].version}" if lam else ""
                parents += lam[:1]
        # device hours and cost: own, and cumulative along every registered ancestor
        hours = float(lineage.device_hours or metrics.get("cost/device_hours") or 0.0)
        amount = metrics.get("cost/amount")
        if amount is None:
            price = prices.get(tags[f"{T}device_type"])
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
        tags.update(lineage_tier_tags(tags, [p.tags for p in parents]))  # `lineage uses` in one search
        return tags

    def _checkpoint_hash(self, ckpt: str, export: Path, run_id: str) -> str | None:
        path = locate(ckpt, export)
        text = None
        if path is not None and (path / MANIFEST_FILE).is_file():
            text = (path / MANIFEST_FILE).read_text()
        else:
            with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp:
                text = Path(self.store.client.download_artifacts(run_id, f"checkpoint/{MANIFEST_FILE}", tmp)
                            ).read_text()
        if not text:
            return None
        from ...train.checkpoint import CheckpointManifest  # torch: only when a checkpoint is registered

        return CheckpointManifest.from_dict(json.loads(text)).content_hash

    def _parent_version(self, parent: str, export: Path) -> tuple[ModelVersionRef | None, str | None]:
        """The registered version a job started from: by URI, else by the parent export's content hash."""
        if parent.startswith("models:/"):
            ref = self.store.resolve(parent)
            return ref, ref.tags.get(f"{T}export_hash")
        path = locate(parent, export)
        if path is None or not path.is_dir():
            # the folder is gone: the path recorded at registration still finds it
            by_path = self.store.versions(None, {f"{T}export_path": str(Path(parent).resolve())})
            return (by_path[0], by_path[0].tags.get(f"{T}export_hash")) if by_path else (None, None)
        digest = export_hash(path)
        found = self.store.versions(None, {f"{T}export_hash": digest})
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
                model_hash = FeatureManifest.read(folder).meta.get("latent_action_model_hash")
            profile = {}
            with contextlib.suppress(Exception):
                profile = json.loads(d.dataset.profile or "{}")
            out[d.dataset.name] = {"feature_hash": profile.get("digest", d.dataset.digest), "model_hash": model_hash}
        return out
