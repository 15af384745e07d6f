"""The recipe's steps: one class per kind (data, training, evaluation, gate), and the graph they form."""

from __future__ import annotations

from typing import Any

from .base import Step, StepKind
from .data import EncodeStep, FlowStep, LatentActionsStep, TierStep
from .evaluate import EvaluateStep
from .gate import GateStep
from .training import LatentActionStep, StageStep

KINDS: dict[str, StepKind] = {k.kind: k() for k in (TierStep, EncodeStep, FlowStep, LatentActionStep,
                                                       LatentActionsStep, StageStep, EvaluateStep, GateStep)}


def build_steps(params: Any) -> list[Step]:
    """The recipe as a list in execution order (each step after its dependencies)."""
    from ...data.latent_actions import lam_tiers

    steps = [Step(f"tier:{t}", "tier", t) for t in params.tiers]
    stages = sorted(params.stages.items(), key=lambda kv: kv[1].stage)
    if any(s.action_source == "latent" for _, s in stages):
        lam = lam_tiers(params)
        steps += [Step(f"flow:{t}", "flow", t, (f"tier:{t}",)) for t in lam]
        lam_model = params.latent_action.registered_model
        steps.append(Step("latent-action", "latent-action", lam_model,
                          tuple(f"flow:{t}" for t in lam) + tuple(f"tier:{t}" for t in lam)))
        # the VAE is gated like a stage's model: latents for Stage 2 come only from a VAE whose probe passed
        steps.append(Step(f"gate:{lam_model}", "gate", lam_model, ("latent-action",)))
        steps += [Step(f"latent-actions:{t}", "latent-actions", t, ("latent-action", f"gate:{lam_model}",
                                                                    f"flow:{t}")) for t in lam]
    if params.data.encoder_cache:  # every tier a stage reads, encoded once for all of them
        steps += [Step(f"encode:{t}", "encode", t, (f"tier:{t}",)) for t in sorted({t for _, s in stages for t in s.tiers})]
    for key, s in stages:
        deps = [f"tier:{t}" for t in s.tiers]
        if params.data.encoder_cache:
            deps += [f"encode:{t}" for t in s.tiers]
        if s.action_source == "latent":
            deps += [f"latent-actions:{t}" for t in s.tiers]
        if s.parent:
            deps.append(f"gate:{s.parent}")
        steps.append(Step(key, "stage", key, tuple(deps)))
        gate_dep = key
        if s.action_source == "real":  # the target robot's model is judged on closed-loop rollouts too
            steps.append(Step(f"evaluate:{s.registered_model}", "evaluate", s.registered_model, (key,)))
            gate_dep = f"evaluate:{s.registered_model}"
        steps.append(Step(f"gate:{s.registered_model}", "gate", s.registered_model, (gate_dep,)))
    return steps


__all__ = ["KINDS", "Step", "StepKind", "build_steps"]
