"""The data steps: a tier (`ingest@<tier>`), its optical flow (`flow@<tier>`) and its latent actions
(`latent-actions@<tier>`). Each is the DVC stage of the same name in dvc.yaml, reproduced and pushed, so
dvc.lock and the remote hold every tier and feature a training step reads; a cached one whose folder is gone
is pulled back."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ...contracts import MANIFEST_FILE
from .base import Context, Step, StepKind


class ContentStep(StepKind):
    """A step whose output is a folder with a manifest and a content hash, made by one DVC stage."""

    outputs: ClassVar[tuple[str, ...]] = ("content_hash", "episodes")

    def dvc_stage(self, step: Step) -> str:
        return f"{self.kind}@{step.target}"

    def folder(self, pipe: Context, step: Step) -> Path:
        raise NotImplementedError

    def content_hash(self, path: Path) -> str | None:
        raise NotImplementedError

    def _hash(self, pipe: Context, step: Step) -> str | None:
        path = self.folder(pipe, step)
        return self.content_hash(path) if (path / MANIFEST_FILE).is_file() else None

    def still_there(self, pipe: Context, step: Step, out: Mapping[str, Any], repair: bool) -> bool:
        if self._hash(pipe, step) == out.get("content_hash"):
            return True
        if not repair:
            return False
        pipe.dvc_pull(self.dvc_stage(step))
        return self._hash(pipe, step) == out.get("content_hash")

    def as_input(self, out: Mapping[str, Any]) -> str | None:
        return out["content_hash"]

    def describe(self, out: Mapping[str, Any]) -> str:
        return f"content {str(out['content_hash'])[:12]}"


class TierStep(ContentStep):
    kind = "tier"
    modules = ("motus.config", "motus.data.ingest", "motus.data.versioning")
    outputs = ("content_hash", "dvc_hash", "level", "episodes")

    def dvc_stage(self, step: Step) -> str:
        return f"ingest@{step.target}"

    def folder(self, pipe: Context, step: Step) -> Path:
        return pipe.paths.tier(step.target)

    def content_hash(self, path: Path) -> str | None:
        from ...data.tier import Tier

        return Tier(path).content_hash

    def config(self, pipe: Context, step: Step) -> dict[str, Any]:
        r = pipe.resolved
        return {"tiers": {step.target: r["tiers"][step.target]},
                "data": {"codec": r["data"]["codec"], "shard_mb": r["data"]["shard_mb"]}}

    def run(self, pipe: Context, step: Step, key: str) -> dict[str, Any]:
        from ...data.tier import Tier
        from ...data.versioning import locked_hashes

        pipe.dvc_repro(self.dvc_stage(step))
        tier = Tier(self.folder(pipe, step))
        return {"content_hash": tier.content_hash, "dvc_hash": locked_hashes(pipe.root).get(step.target),
                "level": tier.manifest.level, "episodes": tier.manifest.episodes}


class FeatureStep(ContentStep):
    """A per-episode feature of one tier (`motus.data.features`)."""

    feature: ClassVar[str]

    def folder(self, pipe: Context, step: Step) -> Path:
        return pipe.paths.feature(self.feature, step.target)

    def content_hash(self, path: Path) -> str | None:
        from ...data.features import Feature

        return Feature(path).content_hash

    def run(self, pipe: Context, step: Step, key: str) -> dict[str, Any]:
        from ...data.features import Feature

        self.prepare(pipe, step)
        pipe.dvc_repro(self.dvc_stage(step))
        f = Feature(self.folder(pipe, step))
        return {"content_hash": f.content_hash, "episodes": len(f)}

    def prepare(self, pipe: Context, step: Step) -> None:
        """What the DVC stage reads that the pipeline puts in place first."""


class FlowStep(FeatureStep):
    """Optical flow between a tier's frames: what the latent-action VAE learns from."""

    kind = "flow"
    feature = "flow"
    modules = ("motus.config", "motus.data.latent_actions")

    def config(self, pipe: Context, step: Step) -> dict[str, Any]:
        from ...data.latent_actions import flow_stride

        # the stride as resolved: a null stride follows the window's downsample, which must change the key too
        flow = pipe.resolved["latent_action"]["flow"]
        return {"latent_action": {"flow": {**flow, "stride": flow_stride(pipe.params),
                                           "views": flow["views"].get(step.target)}}}  # this tier's views only


class LatentActionsStep(FeatureStep):
    """A tier's latent actions, from the latent-action VAE this run registered (published where dvc.yaml's
    `latent-actions@<tier>` stage reads it). Its config is the VAE's version, which is in its key already."""

    kind = "latent-actions"
    feature = "latent_actions"
    modules = ("motus.config", "motus.data.latent_actions")

    def prepare(self, pipe: Context, step: Step) -> None:
        publish(pipe.model_export(pipe.dep_output(step, "latent-action")), pipe.paths.latent_action_model)


class EncodeStep(FeatureStep):
    """What the frozen encoders make of every window of a tier (`motus.data.encoded`), read by the stages
    instead of decoding video. Its config is what decides the encoders and the windows: the model section
    (preset, geometry, weights), the seed of the random tiny bases, the window, and whether a stage reading
    the tier uses the VLM; a change to any of them is a new key, which `pipeline plan` names."""

    kind = "encode"
    feature = "encoded"
    modules = ("motus.config", "motus.train.encode")

    def config(self, pipe: Context, step: Step) -> dict[str, Any]:
        from ...train.encode import readers_of

        r = pipe.resolved
        return {"model": r["model"], "project": {"seed": r["project"]["seed"]},
                "data": {"window": r["data"]["window"]},
                "encoded": {"understanding": any(x.uses_understanding for x in readers_of(pipe.params, step.target))}}

    def still_there(self, pipe: Context, step: Step, out: Mapping[str, Any], repair: bool) -> bool:
        from ...data.features import Feature

        # a shard that fails its sha256 is rebuilt by rerunning the step, not trusted because its manifest is
        if not super().still_there(pipe, step, out, repair):
            return False
        return not Feature(self.folder(pipe, step)).verify()


def publish(export: Path, target: Path) -> None:
    """Put `export` at `target` (replaced whole, by a rename) unless the same content is already there."""
    import shutil

    from ...data.tier import folder_hash

    if target.is_dir() and folder_hash(target) == folder_hash(export):
        return
    tmp = target.with_name(target.name + ".publishing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(export, tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
