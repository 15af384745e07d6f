"""One registered version, loaded for serving: refused at load unless it is a policy a robot can run, warmed up
on a probe before it is let near a request.

A version is refused at load (`LoadRefused`, naming the version and the reason) when its export has no serving
contract, when an action space lacks its normalisation contract (the actions could not be put back into the
robot's units), or when it acts in another action space than the deployment expects (`Expectation`: the
embodiment and action width the robots behind this server take). A loaded version must then answer a probe (the
space's instruction, a mid-grey frame, the state at its training mean) with a finite chunk of the contract's
shape (`WarmUpFailed` otherwise): a model whose weights went NaN, or that cannot run on this device, never
answers a robot.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contracts import ContractError, ServingContract
from ..evaluate.export import ExportedModel, ExportError, Observation, Plan, load_export
from ..evaluate.remote import encode_image
from ..train.precision import autocast
from .request import PolicyRequest


class LoadRefused(RuntimeError):
    """A version this deployment will not serve; the message names it and why."""


class WarmUpFailed(RuntimeError):
    """A version that loaded but did not answer its probe input sanely."""


@dataclass(frozen=True)
class Expectation:
    """What the robots behind a deployment take: a version acting in anything else is refused at load."""

    embodiment: str | None = None
    action_dim: int | None = None

    def mismatch(self, contract: ServingContract) -> str | None:
        for s in contract.spaces:
            if self.embodiment is not None and s.embodiment != self.embodiment:
                return f"action space '{s.tier}' is for embodiment '{s.embodiment}', this deployment serves " \
                       f"'{self.embodiment}'"
            if self.action_dim is not None and s.action_dim != self.action_dim:
                return f"action space '{s.tier}' has {s.action_dim} action dims, this deployment expects " \
                       f"{self.action_dim}"
        return None


@dataclass
class ServedVersion:
    name: str
    version: int | None  # None: an export served from a folder, not the registry
    export_hash: str | None
    exported: ExportedModel
    contract: ServingContract
    loaded_s: float = 0.0
    warm_up_s: float = 0.0
    precision: str = "fp32"  # what the forward passes compute in here (bf16: autocast), whatever it trained in

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.version is not None else f"{self.name} ({self.exported.path})"

    @classmethod
    def load(cls, export_dir: Path, *, name: str | None = None, version: int | None = None,
             export_hash: str | None = None, device: str = "cpu", precision: str | None = None,
             expect: Expectation | None = None) -> ServedVersion:
        """`precision`: auto (bf16 on CUDA, fp32 on a CPU) | bf16 | fp32, chosen by configuration."""
        from ..train.precision import PrecisionError, resolve

        t = time.perf_counter()
        try:
            computes = resolve(precision, torch.device(device), source="serving precision")
        except PrecisionError as e:
            raise LoadRefused(str(e)) from None
        label = f"{name} v{version}" if name and version is not None else str(export_dir)
        folder = Path(export_dir) if ServingContract.exists(Path(export_dir)) else Path(export_dir) / "export"
        if not ServingContract.exists(folder):
            raise LoadRefused(f"{label}: its export has no serving contract (serving.json): a Stage 3 policy or a "
                              "Stage 1 video model trained by this version of `motus train` has one (Stage 2's "
                              "actions are latent: in no robot's units)")
        try:
            contract = ServingContract.read(folder)
            exported = load_export(folder, None, device, policy=contract.is_policy)
        except (ExportError, ContractError) as e:
            raise LoadRefused(f"{label}: {e}") from None
        norm = exported.lineage.normalization or {}
        for s in (s for s in contract.spaces if s.acts):
            n = norm.get(s.tier)
            if not n or "method" not in n or (n["method"] != "none" and not n.get("actions")):
                raise LoadRefused(f"{label}: action space '{s.tier}' has no normalisation contract in its lineage "
                                  "record (its actions could not be put back into the robot's units)")
            if n.get("action_dim") not in (None, s.action_dim):
                raise LoadRefused(f"{label}: action space '{s.tier}' has {s.action_dim} action dims but its "
                                  f"normalisation {n.get('action_dim')}")
        why = (expect or Expectation()).mismatch(contract)
        if why:
            raise LoadRefused(f"{label}: {why}")
        return cls(name or exported.lineage.registered_model, version, export_hash, exported, contract,
                   loaded_s=time.perf_counter() - t, precision=computes)

    # -- answering ------------------------------------------------------------------------------------------
    def plan(self, requests: list[PolicyRequest]) -> list[Plan]:
        """What the model gives each request, in request order (actions in the robot's units, frames as uint8
        arrays); requests of one action space, mode and step count share a forward pass."""
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.group].append(i)
        out: list[Plan | None] = [None] * len(requests)
        device = self.exported.device
        for (tier, mode, steps, frames), rows in groups.items():
            obs = [Observation(requests[i].frame, requests[i].state, requests[i].instruction,
                               None if requests[i].seed is None else
                               torch.Generator(device=device).manual_seed(requests[i].seed), requests[i].actions)
                   for i in rows]
            with autocast(self.precision, device):
                plans = self.exported.plan_batch(obs, tier, mode=mode, steps=steps, with_frames=frames)
            for i, plan in zip(rows, plans, strict=True):
                out[i] = plan
        return out

    def act(self, requests: list[PolicyRequest]) -> list[dict[str, Any]]:
        """`plan`'s answers as the server sends them (JSON: actions as lists, frames in the wire form)."""
        answers = []
        for r, plan in zip(requests, self.plan(requests), strict=True):
            answer: dict[str, Any] = {"model": self.name, "version": self.version, "tier": r.space.tier,
                                      "mode": r.mode, "hold": self.contract.hold}
            if plan.actions is not None:
                answer["actions"] = plan.actions.tolist()
            if plan.frames is not None:
                answer["frames"] = [encode_image(f) for f in plan.frames]
            answers.append(answer)
        return answers

    def probe(self, tier: str | None = None) -> PolicyRequest:
        """A request every healthy version answers: the space's instruction, a mid-grey frame, the training mean
        state (zeros in normalised units)."""
        space = self.contract.space(tier)
        frame = np.full((*space.image_size, 3), 128, dtype=np.uint8)
        if not space.acts:  # a video model: the frames are the answer
            return PolicyRequest(space, frame, np.zeros(0, np.float32), space.instruction, "vgm", seed=0)
        norm = self.exported.normalization(space.tier)
        stats = norm.get("state") or {}
        if stats.get("mean") is not None:
            state = np.asarray(stats["mean"], dtype=np.float32)
        elif stats.get("q01") is not None and stats.get("q99") is not None:
            state = (np.asarray(stats["q01"], dtype=np.float32) + np.asarray(stats["q99"], dtype=np.float32)) / 2
        else:
            state = np.zeros(space.state_dim, dtype=np.float32)
        state = np.resize(state, space.state_dim)
        return PolicyRequest(space, frame, state, space.instruction, "vla", seed=0)

    def warm_up(self) -> float:
        """Answer the probe of every action space; WarmUpFailed unless each is a finite [chunk, action_dim] (a
        video model's: its future frames)."""
        t = time.perf_counter()
        for s in self.contract.spaces:
            try:  # non-finite actions or frames raise here (ExportedModel.plan_batch)
                plan = self.plan([self.probe(s.tier)])[0]
            except Exception as e:  # noqa: BLE001 - whatever breaks, the version is not served
                raise WarmUpFailed(f"{self.label}: the warm-up inference on '{s.tier}' failed: "
                                   f"{type(e).__name__}: {e}") from e
            if not s.acts:
                n = 0 if plan.frames is None else len(plan.frames)
                if n != self.exported.cfg.num_frames - 1:
                    raise WarmUpFailed(f"{self.label}: the warm-up on '{s.tier}' returned {n} frames, the model "
                                       f"predicts {self.exported.cfg.num_frames - 1}")
            elif plan.actions is None or plan.actions.shape != (self.contract.chunk, s.action_dim):
                got = None if plan.actions is None else list(plan.actions.shape)
                raise WarmUpFailed(f"{self.label}: the warm-up on '{s.tier}' returned actions of shape {got}, "
                                   f"the contract says [{self.contract.chunk}, {s.action_dim}]")
        self.warm_up_s = time.perf_counter() - t
        return self.warm_up_s

    def metadata(self) -> dict[str, Any]:
        lineage = self.exported.lineage
        return {"name": self.name, "version": self.version, "export_hash": self.export_hash,
                "lineage": {"run_id": lineage.run_id, "stage": lineage.stage, "config_hash": lineage.config_hash,
                            "code_commit": lineage.code_commit, "parent": lineage.parent,
                            "tiers": {t.name: t.content_hash for t in lineage.tiers}},
                "precision": self.precision, "trained_precision": lineage.precision,
                "device": str(self.exported.device),
                "modes": list(self.contract.modes), "chunk": self.contract.chunk, "hold": self.contract.hold,
                "action_spaces": [s.to_json() for s in self.contract.spaces],
                "normalization": {s.tier: dict(lineage.normalization[s.tier]) for s in self.contract.spaces
                                  if s.acts},
                "loaded_seconds": round(self.loaded_s, 3), "warm_up_seconds": round(self.warm_up_s, 3)}
