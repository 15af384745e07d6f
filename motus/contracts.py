"""The records that cross rooms: frozen, versioned dataclasses, each with one JSON codec.

Why one module, leftmost in the import order: a record written by one room and read by another (a job's
lineage written by `train`, read by `evaluate`, `track` and `pipeline`; a job spec written by the CLI or the
pipeline, read by a launcher and by the worker in another process or pod) must mean the same thing on both
sides. When each side parses its own dict, the two drift: the tier hash used to travel under two names
(`digest`, `content_hash`) and `lineage.json` had two shapes. Here each record has one definition, one
`to_json`, one `from_json`, and a `schema_version`.

Compatibility: readers accept the previous on-disk shapes (schema 0: the unversioned `lineage.json` of stage
and latent-action exports, the flat job spec) for one release; writers only write the current one.

Hashes have two names and two meanings, never mixed:
- `content_hash`: sha256 over a tier's (or feature's) shard entries, from its manifest. The identity lineage
  records and `lineage show` prints. It is the same wherever the folder lives.
- `dvc_hash`: DVC's md5 of the folder (its `.dir` entry in `dvc.lock`), when the tier is DVC-versioned. It says
  which DVC object to `dvc pull`; it is kept beside the content hash, never instead of it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

LINEAGE_FILE = "lineage.json"


class ContractError(ValueError):
    """A record on disk or on the wire that does not fit its contract; the message names the file and key."""


def _need(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ContractError(f"{where}: missing '{key}'")
    return d[key]


def _check_schema(d: Mapping[str, Any], current: int, where: str) -> int:
    version = int(d.get("schema_version", 0))
    if version > current:
        raise ContractError(f"{where}: schema_version {version} is newer than this motus reads ({current}); "
                            "upgrade motus")
    return version


# ------------------------------------------------------------------------------------------------ accounting

def device_hours(nodes: int, devices_per_node: int, wall_seconds: float) -> float:
    """Accelerator hours a job held: every device of every node for the whole wall time. The one definition
    lineage records, run metrics, cluster status and plans use."""
    if nodes < 0 or devices_per_node < 0 or wall_seconds < 0:
        raise ValueError(
            f"device_hours needs non-negative inputs, got nodes={nodes}, "
            f"devices_per_node={devices_per_node}, wall_seconds={wall_seconds}")
    return nodes * devices_per_node * wall_seconds / 3600.0


# ------------------------------------------------------------------------------------------------ tiers

@dataclass(frozen=True)
class TierRef:
    """A tier as an input: which version of it a job read, and with what weight in the stage's mix."""

    name: str
    level: int | None
    content_hash: str
    dvc_hash: str | None = None
    weight: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any] | str, where: str = "tier") -> TierRef:
        if isinstance(d, str):  # schema 0 latent-action export: {tier: content hash}
            return cls(name=name, level=None, content_hash=d)
        if "digest" in d and "content_hash" in d:  # schema 0 stage export: digest = DVC md5 or the content hash
            digest = d.get("digest") or None
            return cls(name=name, level=d.get("level"), content_hash=d["content_hash"],
                       dvc_hash=digest if digest != d["content_hash"] else None, weight=d.get("weight"))
        return cls(name=name, level=d.get("level"), content_hash=_need(d, "content_hash", f"{where} {name}"),
                   dvc_hash=d.get("dvc_hash"), weight=d.get("weight"))

    def short(self) -> str:
        return self.content_hash[:12]


def _read_json(path: Path, what: str) -> Mapping[str, Any]:
    if not path.is_file():
        raise ContractError(f"{path}: not found; {what}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ContractError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, Mapping):
        raise ContractError(f"{path}: not a JSON object")
    return d


MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class TierManifest:
    """A built tier's `manifest.json`: what it holds (counts, dims, views, statistics), where (its shards, each
    with its sha256) and its identity (`content_hash`, over the episode index and the shards). Written by the
    tier writer (`data/tier.py`); every other room reads these attributes, never the JSON."""

    SCHEMA = 1  # the episode schema the tier's shards are written in

    tier: str
    level: int
    content_hash: str
    episodes: int
    frames: int
    shards: tuple[Mapping[str, Any], ...]
    quarantined: int = 0
    # every episode the source yielded: episodes + quarantined (None: a tier built before this was counted)
    source_episodes: int | None = None
    without_instruction: int = 0  # kept episodes with no language instruction (reported, not refused)
    embodiment: str | None = None
    embodiments: Mapping[str, int] = field(default_factory=dict)
    action_dim: int | None = None
    action_names: tuple[str, ...] | None = None  # one per action dim, in order (joint names); None = unnamed
    state_dim: int | None = None
    fps: float | None = None
    fps_values: tuple[float, ...] = ()
    # {view: [height, width]} in the source's camera order (the first is a window's default view); written as a
    # list of [view, [height, width]] so that a JSON writer sorting keys keeps the order (older tiers: a dict)
    views: Mapping[str, Any] = field(default_factory=dict)
    codec: str | None = None
    action_stats: Mapping[str, Any] | None = None  # None when the tier has no actions
    state_stats: Mapping[str, Any] | None = None
    source: Mapping[str, Any] = field(default_factory=dict)
    description: str | None = None
    index_sha256: str | None = None
    schema_version: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(shards=[dict(s) for s in self.shards], fps_values=list(self.fps_values),
                 action_names=list(self.action_names) if self.action_names else None,
                 embodiments=dict(self.embodiments), views=[[k, list(v)] for k, v in self.views.items()],
                 source=dict(self.source))
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = MANIFEST_FILE) -> TierManifest:
        if d.get("schema_version") != cls.SCHEMA:
            raise ContractError(f"{where}: schema_version {d.get('schema_version')} is not {cls.SCHEMA}")
        for key in ("tier", "level", "content_hash", "episodes", "frames", "shards"):
            _need(d, key, where)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.update(shards=tuple(d["shards"]), fps_values=tuple(d.get("fps_values") or ()),
                      action_names=tuple(d["action_names"]) if d.get("action_names") else None,
                      embodiments=d.get("embodiments") or {}, views=dict(d.get("views") or {}),
                      source=d.get("source") or {})
        return cls(**values)

    @classmethod
    def read(cls, folder: Path) -> TierManifest:
        path = Path(folder) / MANIFEST_FILE
        return cls.from_json(_read_json(path, f"is '{folder}' a built tier? (run `motus data ingest`)"), str(path))

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / MANIFEST_FILE).is_file()


@dataclass(frozen=True)
class FeatureManifest:
    """A feature store's `manifest.json` (flow images, latent actions of one tier): its arrays' schema
    ({name: {dtype, shape}}), shards, the `tier_hash` it was computed from (a different hash = stale), `meta`
    (how it was computed) and its own `content_hash`. Written by `data/features.py`."""

    SCHEMA = 1

    feature: str
    tier: str
    tier_hash: str
    content_hash: str
    arrays: Mapping[str, Mapping[str, Any]]
    shards: tuple[Mapping[str, Any], ...]
    episodes: int = 0
    compress: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)
    index_sha256: str | None = None
    schema_version: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(shards=[dict(s) for s in self.shards], arrays={k: dict(v) for k, v in self.arrays.items()},
                 meta=dict(self.meta))
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = MANIFEST_FILE) -> FeatureManifest:
        if d.get("schema_version") != cls.SCHEMA:
            raise ContractError(f"{where}: schema_version {d.get('schema_version')} is not {cls.SCHEMA}")
        missing = [k for k in ("feature", "tier", "tier_hash", "shards", "arrays", "content_hash") if k not in d]
        if missing:
            raise ContractError(f"{where}: missing keys {missing}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.update(shards=tuple(d["shards"]), meta=d.get("meta") or {})
        return cls(**values)

    @classmethod
    def read(cls, folder: Path) -> FeatureManifest:
        path = Path(folder) / MANIFEST_FILE
        return cls.from_json(_read_json(path, f"is '{folder}' a built feature store?"), str(path))

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / MANIFEST_FILE).is_file()


# ------------------------------------------------------------------------------------------------ models

@dataclass(frozen=True)
class ModelRef:
    """One registered version: `name/version` (an alias resolves to one of these)."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.rpartition("/")
        if not sep or not version.isdigit():
            raise ContractError(f"'{text}' is not NAME/VERSION")
        return cls(name.removeprefix("models:/"), int(version))


# ------------------------------------------------------------------------------------------------ jobs

@dataclass(frozen=True)
class JobSpec:
    """One training job, as every launcher takes it: `local` runs it as torchrun processes, `kubernetes` as a
    PyTorchJob. `stage` is a params.yaml stage key or `latent-action` (the latent-action VAE job)."""

    SCHEMA = 1

    stage: str
    run_dir: Path  # checkpoints, metrics.jsonl, export
    params_file: Path
    nodes: int = 1
    procs_per_node: int = 1  # GPUs per node on a cluster; processes on a CPU machine
    pool: str | None = None
    image: str | None = None  # container image (kubernetes)
    init_from: str | None = None  # parent model export (Stage 2/3)
    max_steps: int | None = None
    precision: str | None = None  # auto | bf16 | fp32; None = what params.yaml says for this job
    track: bool = True
    env: Mapping[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA

    # What a worker process reads from the spec. Placement (nodes, processes, pool, image) is the launcher's:
    # the process learns its world from the environment torchrun or the operator sets. `env` is delivered as
    # the environment too (values on a command line show in `ps` and in pod specs).
    WORKER_FIELDS = ("stage", "run_dir", "params_file", "init_from", "max_steps", "precision", "track",
                     "schema_version")

    def worker_args(self) -> list[str]:
        """The worker's command line (`python -m motus.launch.worker --spec JSON`), the same on every launcher
        and every pool: the submitted spec's WORKER_FIELDS, so the worker runs exactly what was submitted."""
        d = self.to_json()
        return ["--spec", json.dumps({k: d[k] for k in self.WORKER_FIELDS}, sort_keys=True, separators=(",", ":"))]

    def for_worker(self) -> JobSpec:
        """This spec as the worker receives it (placement and env left to the launcher)."""
        return JobSpec.from_json({k: v for k, v in self.to_json().items() if k in self.WORKER_FIELDS})

    def with_updates(self, **changes: Any) -> JobSpec:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(run_dir=str(self.run_dir), params_file=str(self.params_file), env=dict(self.env),
                 schema_version=self.SCHEMA)
        return d

    def to_dict(self) -> dict[str, Any]:  # the name `motus k8s` and run records used before schema 1
        return self.to_json()

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "job spec") -> JobSpec:
        _check_schema(d, cls.SCHEMA, where)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ContractError(f"{where}: unknown key(s) {unknown}")
        values = dict(d)
        values.update(stage=str(_need(d, "stage", where)), run_dir=Path(_need(d, "run_dir", where)),
                      params_file=Path(_need(d, "params_file", where)), env=dict(d.get("env") or {}),
                      schema_version=cls.SCHEMA)
        return cls(**values)


# ------------------------------------------------------------------------------------------------ lineage

STAGE_JOB, LATENT_ACTION_JOB = "stage", "latent-action"


@dataclass(frozen=True)
class LineageRecord:
    """What a training job's export says about how it was made: written by the job, read by every other room.

    `features` maps a feature name (`flow/<tier>`, `latent_actions/<tier>`) to its content hash. `parent` is
    what the job started from (an export path or `models:/` URI), resolved to a version by the registry.
    `code_dirty` counts changes to the code only (data files and lock files of the project are not code).
    """

    SCHEMA = 1

    job: str  # STAGE_JOB | LATENT_ACTION_JOB
    registered_model: str
    config_hash: str
    tiers: tuple[TierRef, ...]
    run_id: str | None = None
    stage: str | None = None  # the params.yaml stage key (stage jobs)
    stage_number: int | None = None
    parent: str | None = None
    checkpoint: str | None = None
    features: Mapping[str, str] = field(default_factory=dict)
    normalization: Mapping[str, Any] | None = None
    device_hours: float = 0.0
    wall_seconds: float | None = None
    precision: str | None = None
    device_type: str | None = None
    code_commit: str | None = None
    code_dirty: bool | None = None
    schema_version: int = SCHEMA

    @property
    def label(self) -> str:
        """What made it, in a word: the stage key, or `latent-action` for the VAE job."""
        return self.stage or self.job

    def tier(self, name: str) -> TierRef | None:
        return next((t for t in self.tiers if t.name == name), None)

    def with_updates(self, **changes: Any) -> LineageRecord:
        return replace(self, **changes)

    # -- codec -----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["tiers"] = {t.name: {k: v for k, v in t.to_json().items() if k != "name"} for t in self.tiers}
        d["features"] = dict(self.features)
        d["normalization"] = dict(self.normalization) if self.normalization is not None else None
        d["schema_version"] = self.SCHEMA
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = LINEAGE_FILE) -> LineageRecord:
        if not isinstance(d, Mapping):
            raise ContractError(f"{where}: not a JSON object")
        version = _check_schema(d, cls.SCHEMA, where)
        if version == 0:
            return cls._from_schema0(d, where)
        tiers = tuple(TierRef.from_json(n, t, where) for n, t in sorted((d.get("tiers") or {}).items()))
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.update(tiers=tiers, features=dict(d.get("features") or {}), schema_version=cls.SCHEMA)
        for key in ("job", "registered_model", "config_hash"):
            _need(d, key, where)
        return cls(**values)

    @classmethod
    def _from_schema0(cls, d: Mapping[str, Any], where: str) -> LineageRecord:
        """The unversioned shapes: stage exports (tiers {name: {level, digest, content_hash, weight}}) and
        latent-action exports (`job: latent-action`, tiers {name: hash}, `flow_features` {tier: hash})."""
        job = LATENT_ACTION_JOB if d.get("job") == LATENT_ACTION_JOB else STAGE_JOB
        tiers = tuple(TierRef.from_json(n, t, where) for n, t in sorted((d.get("tiers") or {}).items()))
        features = {f"flow/{t}": h for t, h in (d.get("flow_features") or {}).items()}
        return cls(job=job, registered_model=str(_need(d, "registered_model", where)),
                   config_hash=str(d.get("config_hash") or ""), tiers=tiers, run_id=d.get("mlflow_run_id"),
                   stage=d.get("stage"), stage_number=d.get("stage_number"), parent=d.get("parent"),
                   checkpoint=d.get("checkpoint"), features=features, normalization=d.get("normalization"),
                   device_hours=float(d.get("device_hours") or 0.0), wall_seconds=d.get("wall_seconds"),
                   precision=d.get("precision"), device_type=d.get("device_type"))

    # -- the file in an export folder ------------------------------------------------------------------
    def write(self, export_dir: Path) -> Path:
        path = Path(export_dir) / LINEAGE_FILE
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True, default=str))
        return path

    @classmethod
    def read(cls, export_dir: Path) -> LineageRecord:
        path = Path(export_dir) / LINEAGE_FILE
        if not path.is_file():
            raise ContractError(f"{path} is missing (a finished `motus train` or `motus latent-action train` "
                                "writes it into <run_dir>/export)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ContractError(f"{path} is not valid JSON: {e}") from None
        return cls.from_json(d, str(path))

    @staticmethod
    def exists(export_dir: Path) -> bool:
        return (Path(export_dir) / LINEAGE_FILE).is_file()


# ------------------------------------------------------------------------------------------------ serving

SERVING_FILE = "serving.json"
# what the registry writes beside an export's files to make it an MLflow model (track/registry/flavour.py), and
# what MLflow itself adds there (`registered_model_meta`, written into a local store's folder when a version is
# loaded by its models:/ URI): not part of the export's content, so not of its hash
PACKAGING_FILES = frozenset({"MLmodel", "python_env.yaml", "requirements.txt", "conda.yaml",
                             "registered_model_meta"})
# what a deployed policy answers (act, act and imagine, imagine given actions), and a video model (imagine)
POLICY_MODES = ("vla", "joint", "wm")
VIDEO_MODES = ("vgm",)
SERVING_MODES = POLICY_MODES + VIDEO_MODES


@dataclass(frozen=True)
class ActionSpace:
    """One robot the model acts for, as it met it in training: the tier whose normalisation its actions are
    un-normalised with, the camera layout a request must send, and the units of what comes back. A video model
    (Stage 1) has spaces too, for their cameras: no state and no actions (`state_dim` = `action_dim` = 0)."""

    tier: str
    embodiment: str | None
    view: str  # the stored view the model was trained on
    image_size: tuple[int, int]  # (height, width) of that view's frames, as stored in the tier
    state_dim: int
    action_dim: int
    action_names: tuple[str, ...] | None = None
    # the cameras a request sends when the stored view is a three-view composition made at ingest (head, left
    # wrist, right wrist); () when the request sends the stored view itself
    source_views: tuple[str, ...] = ()
    instruction: str = ""  # an instruction of the tier (the warm-up probe's)

    @property
    def acts(self) -> bool:
        return self.action_dim > 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["action_names"] = list(self.action_names) if self.action_names is not None else None
        d["source_views"] = list(self.source_views)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> ActionSpace:
        size = _need(d, "image_size", where)
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0
                                                                            for v in size)):
            raise ContractError(f"{where}: image_size must be [height, width] positive integers, got {size!r}")
        names = d.get("action_names")
        return cls(tier=str(_need(d, "tier", where)), embodiment=d.get("embodiment"), view=str(_need(d, "view", where)),
                   image_size=(int(size[0]), int(size[1])), state_dim=int(_need(d, "state_dim", where)),
                   action_dim=int(_need(d, "action_dim", where)),
                   action_names=tuple(names) if names is not None else None,
                   source_views=tuple(d.get("source_views") or ()), instruction=str(d.get("instruction") or ""))


@dataclass(frozen=True)
class ServingContract:
    """What a deployment needs to turn a robot's observation into the model's inputs and its output back into
    the robot's units, written by the job beside its export (`serving.json`): nothing is re-derived elsewhere
    (the tiers, params.yaml and the training code's defaults need not be where the model is served).

    `chunk` actions per answer, each to be held for `hold` control steps (the window's downsample); the action
    and state normalisation of each space is the lineage record's (`normalization[tier]`)."""

    SCHEMA = 1

    registered_model: str
    stage_number: int
    modes: tuple[str, ...]
    chunk: int
    hold: int
    spaces: tuple[ActionSpace, ...]
    schema_version: int = SCHEMA

    @property
    def is_policy(self) -> bool:
        """A model that acts (Stage 3), not one that only imagines video (Stage 1)."""
        return any(m in POLICY_MODES for m in self.modes)

    def space(self, tier: str | None) -> ActionSpace:
        """The action space of `tier`; with None, the only one (ContractError naming the choices otherwise)."""
        if tier is None:
            if len(self.spaces) == 1:
                return self.spaces[0]
            raise ContractError(f"the model acts in {len(self.spaces)} action spaces {[s.tier for s in self.spaces]}: "
                                "name one (tier)")
        for s in self.spaces:
            if s.tier == tier:
                return s
        raise ContractError(f"no action space '{tier}' (expected one of {[s.tier for s in self.spaces]})")

    def to_json(self) -> dict[str, Any]:
        return {"registered_model": self.registered_model, "stage_number": self.stage_number,
                "modes": list(self.modes), "chunk": self.chunk, "hold": self.hold,
                "spaces": [s.to_json() for s in self.spaces], "schema_version": self.SCHEMA}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = SERVING_FILE) -> ServingContract:
        if not isinstance(d, Mapping):
            raise ContractError(f"{where}: not a JSON object")
        _check_schema(d, cls.SCHEMA, where)
        modes = tuple(_need(d, "modes", where))
        bad = [m for m in modes if m not in SERVING_MODES]
        if bad:
            raise ContractError(f"{where}: unknown mode(s) {bad}; expected some of {list(SERVING_MODES)}")
        spaces = tuple(ActionSpace.from_json(s, f"{where} spaces[{i}]")
                       for i, s in enumerate(_need(d, "spaces", where)))
        if not spaces:
            raise ContractError(f"{where}: no action space")
        return cls(registered_model=str(_need(d, "registered_model", where)),
                   stage_number=int(_need(d, "stage_number", where)), modes=modes,
                   chunk=int(_need(d, "chunk", where)), hold=int(_need(d, "hold", where)), spaces=spaces)

    def write(self, export_dir: Path) -> Path:
        path = Path(export_dir) / SERVING_FILE
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        return path

    @classmethod
    def read(cls, export_dir: Path) -> ServingContract:
        path = Path(export_dir) / SERVING_FILE
        return cls.from_json(_read_json(path, "a Stage 3 or Stage 1 export written by this version of `motus train` "
                                              "has one"), str(path))

    @staticmethod
    def exists(export_dir: Path) -> bool:
        return (Path(export_dir) / SERVING_FILE).is_file()


# ------------------------------------------------------------------------------------- evaluation and gates

# The metrics an evaluation (`motus.evaluate`) reports, by name after `eval/` (closed-loop rates also per task:
# `eval/<task>/<name>`). A gate rule is checked against this list when params.yaml is loaded, so a typo in a
# rule is a config error instead of a gate that can never pass.
EVALUATION_RATES = frozenset({"success_rate", "joint_success_rate", "floor_zero_success_rate",
                              "floor_random_success_rate", "ceiling_success_rate"})
EVALUATION_METRICS = EVALUATION_RATES | frozenset({
    "vla_action_mse", "idm_action_mse", "joint_action_mse", "floor_zero_action_mse", "untrained_action_mse",
    "vla_action_mse_x0", "idm_action_mse_x0",
    "wm_psnr", "wm_ssim", "wm_floor_copy_psnr", "wm_floor_copy_ssim", "wm_ceiling_vae_psnr", "wm_ceiling_vae_ssim",
    "joint_psnr", "joint_ssim", "wm_lpips", "wm_fvd"})
RATE_STATISTICS = ("wilson", "clopper-pearson")

# What a stage job's held-out validation logs, by name after `val/` (`motus.train.stage.StageJob.validate`); action
# metrics only where the stage trains actions. Gate rules on `val/` metrics are checked against it like `eval/` ones.
VALIDATION_METRICS = frozenset({
    "video_loss", "action_loss", *(f"{k}_loss_t{t}" for k in ("video", "action") for t in (0.25, 0.5, 0.75)),
    "vla_action_mse", "vla_action_mse_x0", "floor_zero_action_mse", "untrained_action_mse",
    "wm_video_mse", "wm_video_psnr", "wm_video_mse_x0", "wm_video_psnr_x0", "windows", "draws"})

# What the latent-action job's validation logs, by name after `lam/` (`motus.train.latent_action.quality`): the
# held-out probe R^2 (mean over embodiments, and `probe_r2/<embodiment>`) and the flow reconstruction PSNR, each
# also for the untrained VAE of the same seed on the same pairs (`untrained_...`), the baseline a gate compares with.
LATENT_ACTION_METRICS = frozenset({"probe_r2", "recon_psnr", "untrained_probe_r2", "untrained_recon_psnr"})
LATENT_ACTION_PER_EMBODIMENT = frozenset({"probe_r2", "untrained_probe_r2"})

# The kinds of tier source a reader exists for (`motus.data.ingest` maps each to its reader; a test keeps the two
# equal), so that `params.yaml` naming another fails at `motus config validate`, not at ingest.
SOURCE_KINDS = ("simulator", "lerobot", "motus-folder", "mp4-folder", "composite", "python")


def is_rate(metric: str) -> bool:
    """A success rate: a fraction of episodes, judged with a confidence bound by statistical gate rules."""
    return metric.rsplit("/", 1)[-1] in EVALUATION_RATES


def rate_interval(k: int, n: int, confidence: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Two-sided `confidence` interval of a success rate seen as k successes in n episodes: Wilson's score
    interval, or the exact (conservative) Clopper-Pearson one."""
    import math
    from statistics import NormalDist

    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"a rate needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    alpha = 1.0 - confidence
    if method == "wilson":
        z = NormalDist().inv_cdf(1 - alpha / 2)
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        return max(0.0, centre - half), min(1.0, centre + half)
    if method != "clopper-pearson":
        raise ValueError(f"unknown rate statistic {method!r} (known: {', '.join(RATE_STATISTICS)})")

    def upper_tail(p: float) -> float:  # P(X >= k | n, p), X ~ Binomial(n, p)
        if p <= 0.0:
            return 0.0 if k > 0 else 1.0
        if p >= 1.0:
            return 1.0
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
        top = max(logs)
        return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))

    def _point(p: float) -> float:  # P(X = k | n, p)
        if p <= 0.0:
            return 1.0 if k == 0 else 0.0
        if p >= 1.0:
            return 1.0 if k == n else 0.0
        return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
                        + (n - k) * math.log1p(-p))

    def solve(target: float, lower_tail: bool) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(80):  # bisection: the tail probabilities are monotone in p
            mid = (lo + hi) / 2
            # lower bound: the p at which seeing >= k has probability alpha/2 (increasing in p)
            # upper bound: the p at which seeing <= k has probability alpha/2 (decreasing in p)
            value = (1.0 - upper_tail(mid) + _point(mid)) if lower_tail else upper_tail(mid)
            if (value > target) == lower_tail:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(alpha / 2, lower_tail=False)
    upper = 1.0 if k == n else solve(alpha / 2, lower_tail=True)
    return lower, upper


# ----------------------------------------------------------------------------------- normalisation contract

# The fields of a tier's normalisation record (`TierWindows.normalization`, stored per tier in every export's
# lineage) that must agree between a model and the data it is given: the method, the action space and the
# statistics. The tier's content hash may differ (a rebuilt tier with the same statistics is the same contract).
NORMALIZATION_FIELDS = ("method", "embodiment", "action_dim", "action_names", "padded_action_dim", "actions", "state")
# compared only where both sides name them: an unnamed tier says nothing about joint order
OPTIONAL_NORMALIZATION_FIELDS = ("action_names",)


def normalization_mismatches(model: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """How the normalisation a model was trained with (`model`) differs from the data's (`data`): one line per
    field, naming both values. A field the model's record does not carry (an older export) is not compared."""
    import math

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-7)
        return a == b

    def short(v: Any) -> str:
        text = json.dumps(v, default=str)
        return text if len(text) <= 120 else text[:117] + "..."

    out = []
    for key in NORMALIZATION_FIELDS:
        if key not in model:
            continue
        if key in OPTIONAL_NORMALIZATION_FIELDS and (model[key] is None or data.get(key) is None):
            continue
        if not same(model[key], data.get(key)):
            if isinstance(model[key], Mapping) and isinstance(data.get(key), Mapping):
                for sub in sorted(set(model[key]) | set(data[key])):
                    if not same(model[key].get(sub), data[key].get(sub)):
                        out.append(f"{key}.{sub}: model {short(model[key].get(sub))}, data {short(data[key].get(sub))}")
            else:
                out.append(f"{key}: model {short(model[key])}, data {short(data.get(key))}")
    return out


def check_normalization(model: Mapping[str, Any], data: Mapping[str, Any], where: str) -> None:
    """Refuse data whose normalisation or action space is not the one the model was trained with: feeding it
    would be silently wrong (actions in other units), and re-normalising it silently would hide that."""
    found = normalization_mismatches(model, data)
    if found:
        raise ContractError(f"{where}: the data's normalisation differs from the model's (trained on tier "
                            f"{model.get('tier')!r}); refusing rather than re-normalising: " + "; ".join(found))


def episodes_for(threshold: float, confidence: float = 0.95, method: str = "wilson") -> int | None:
    """The fewest episodes whose perfect run (n of n) has a lower confidence bound >= `threshold`; None when no
    number of episodes can (a threshold of 1). Closed forms for n of n: Clopper-Pearson (alpha/2)^(1/n), Wilson
    n / (n + z^2); then checked against `rate_interval`, so the answer is exact for the interval actually used."""
    import math
    from statistics import NormalDist

    if threshold <= 0:
        return 1
    if threshold >= 1:
        return None
    alpha = 1.0 - confidence
    if method == "clopper-pearson":
        n = math.ceil(math.log(alpha / 2) / math.log(threshold))
    else:
        z = NormalDist().inv_cdf(1 - alpha / 2)
        n = math.ceil(threshold * z * z / (1 - threshold))
    n = max(1, n - 2)
    while rate_interval(n, n, confidence, method)[0] < threshold:
        n += 1
    return n


# ------------------------------------------------------------------------------------------------ secrets

# Credentials live in the environment only. Anything the platform prints, writes or logs passes through
# `mask_secrets`: the password of any URI (`scheme://user:PASSWORD@host`) and the value of every credential-bearing
# environment variable are replaced by `***`, wherever they appear in the text.
MASK = "***"
# a credential variable: a word of its name (split at `_`) says so; `TOKENIZERS_PARALLELISM` is not one
_SECRET_WORDS = frozenset({"PASSWORD", "PASSWD", "SECRET", "TOKEN", "CREDENTIAL", "CREDENTIALS", "APIKEY"})
_SECRET_PAIRS = frozenset({("API", "KEY"), ("PRIVATE", "KEY"), ("ACCESS", "KEY")})
_URI_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s'\"]*:)(?P<pw>[^@/\s'\"]+)(?=@)", re.IGNORECASE)
# masked by value only from this length: a shorter value would mask ordinary words (a test fixture's
# `AWS_SECRET_ACCESS_KEY=test` turned every "pytest" into "py***"); a URI's password is masked by its place in the
# URI, whatever its length
_MIN_SECRET = 8
_NOT_SECRETS = frozenset({"true", "false", "yes", "no", "none", "null", "auto"})


def _is_secret_name(name: str) -> bool:
    words = name.upper().split("_")
    return bool(_SECRET_WORDS & set(words)) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


def _secretish(value: str) -> bool:
    return len(value) >= _MIN_SECRET and value.lower() not in _NOT_SECRETS


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's credential variables, and the passwords inside URIs the environment holds."""
    env = os.environ if env is None else env
    found = {v for k, v in env.items() if _is_secret_name(k) and _secretish(v)}
    for v in env.values():
        found.update(m.group("pw") for m in _URI_PASSWORD.finditer(v) if _secretish(m.group("pw")))
    return sorted(found, key=len, reverse=True)  # longest first: a secret containing another is masked whole


def _mask(text: str, secrets: list[str]) -> str:
    out = _URI_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    for secret in secrets:
        out = out.replace(secret, MASK)
    return out


def mask_secrets(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with every URI password and every credential value of the environment replaced by `***`."""
    return _mask(text, secret_values(env)) if text else text


class MaskedStream:
    """A text stream that masks secrets in everything written through it (see `mask_secrets`): what a process's
    stdout/stderr become at its entry point, so every printer, table, log line and traceback is covered. The
    secrets are read from the environment once, when the stream is made."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._secrets = secret_values()

    def write(self, text: str) -> int:
        self._stream.write(_mask(text, self._secrets))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, flush, ...: the real stream's
        return getattr(self._stream, name)


def mask_process_output() -> None:
    """Route this process's stdout and stderr through `MaskedStream` (idempotent)."""
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, MaskedStream):
            setattr(sys, name, MaskedStream(stream))


class ServiceUnreachable(RuntimeError):
    """A service the platform needs (the tracking store, the object store) does not answer: said at once, in one
    line naming the (masked) address, by every entry point."""
