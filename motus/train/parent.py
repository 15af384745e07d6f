"""Starting a stage from its parent's exported weights. A failed or partial load is FATAL, never swallowed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..contracts import ContractError, LineageRecord, check_normalization
from ..model.motus import CONFIG_FILE, EXPERTS, WEIGHTS_FILE, MotusModel

# Stage 2 -> 3: the action encoder/decoder change meaning (latent -> real actions, + state and registers)
ACTION_IO_PREFIXES = ("action.encoder.action_in.", "action.encoder.state_in.", "action.encoder.registers",
                      "action.decoder.head.")


class ParentLoadError(Exception):
    pass


def parent_experts(export_dir: str | Path) -> tuple[str, ...]:
    """The experts a parent actually trained: a Stage 1 export holds a trained video expert only (its action
    and understanding experts are untouched initialisations, in another encoder mode), later stages all three."""
    if LineageRecord.exists(export_dir):
        try:
            if LineageRecord.read(export_dir).stage_number == 1:
                return ("video",)
        except ContractError as e:
            raise ParentLoadError(f"parent checkpoint '{export_dir}': {e}") from None
    return EXPERTS


def load_parent(model: MotusModel, export_dir: str | Path, *, drop_action_io: bool,
                experts: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Copy the parent export's expert weights into `model`; returns what was dropped and kept fresh.

    `experts` limits the copy (default: what the parent trained, see `parent_experts`). Every other key of
    those experts must exist on both sides with the same shape, or this raises naming the checkpoint.
    """
    d = Path(export_dir)
    weights = d / WEIGHTS_FILE
    if not (d / CONFIG_FILE).exists() or not weights.exists():
        raise ParentLoadError(f"parent checkpoint '{d}' is missing or incomplete: expected {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE} there (a model export from `save_pretrained`)")
    try:
        json.loads((d / CONFIG_FILE).read_text())
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same fatal condition
        raise ParentLoadError(f"parent checkpoint '{d}' cannot be read: {e}") from None
    experts = experts or parent_experts(d)
    own = {f"{n}.{k}": v for n in experts for k, v in model.expert(n).state_dict().items()}
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] in experts}
    dropped = sorted(k for k in set(state) | set(own) if drop_action_io and k.startswith(ACTION_IO_PREFIXES))
    missing = sorted(k for k in own if k not in state and k not in dropped)
    unexpected = sorted(k for k in state if k not in own and k not in dropped)
    mismatched = sorted(f"{k}: parent {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in own if k in state and k not in dropped and state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"parent checkpoint '{d}' is incompatible with this stage's model:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {label} ({len(items)}): {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        raise ParentLoadError("\n".join(lines))
    with torch.no_grad():
        for k, v in own.items():
            if k not in dropped:
                v.copy_(state[k])
    return {"dropped": dropped, "loaded": sorted(k for k in own if k not in dropped)}


def check_parent_normalization(export_dir: str | Path, normalization: dict[str, dict], *, keeps_action_io: bool) -> None:
    """A parent whose action head is kept (not re-initialised) predicts actions in the units it was trained on:
    a tier it shares with this job must be normalised the same way, or the head's outputs mean something else."""
    if not keeps_action_io or not LineageRecord.exists(export_dir):
        return
    try:
        lineage = LineageRecord.read(export_dir)
    except ContractError as e:
        raise ParentLoadError(f"parent checkpoint '{export_dir}': {e}") from None
    if lineage.stage_number == 1:  # a Stage 1 parent trained no actions
        return
    for tier, theirs in sorted((lineage.normalization or {}).items()):
        if tier in normalization:
            try:
                check_normalization(theirs, normalization[tier], where=f"parent checkpoint '{export_dir}', tier '{tier}'")
            except ContractError as e:
                raise ParentLoadError(str(e)) from None
