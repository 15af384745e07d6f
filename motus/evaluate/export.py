"""A model export, loaded for inference: the network, its frozen parts, lineage, and its window geometry.

An export (what `motus.train.stage.StageJob.export` writes) holds `motus_config.json` + `model.safetensors`,
the frozen VAE/VLM/text encoder when they have no local weights path, and the lineage record (tiers and their
action/state normalisation). Everything the evaluator feeds the model is built through
`motus.train.inputs.window_inputs`, the function training uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..contracts import LINEAGE_FILE, ContractError, LineageRecord
from ..data.loader import WindowSpec, window_spec_from_params
from ..model import MotusModel
from ..model.text import FrozenTextEncoder
from ..train.inputs import window_inputs

REQUIRED_FILES = ("motus_config.json", "model.safetensors", LINEAGE_FILE)


class ExportError(ValueError):
    """A folder that is not a usable model export; the message names the folder and what is missing."""


@dataclass
class ExportedModel:
    path: Path
    model: MotusModel
    text: FrozenTextEncoder
    lineage: LineageRecord
    spec: WindowSpec
    device: torch.device

    @property
    def cfg(self) -> Any:
        return self.model.config

    @property
    def uses_understanding(self) -> bool:
        return self.model.vlm is not None

    def normalization(self, tier: str) -> dict[str, Any]:
        norm = self.lineage.normalization or {}
        if tier not in norm:
            raise ExportError(f"{self.path / LINEAGE_FILE}: no normalization for tier '{tier}' "
                              f"(has {sorted(norm)})")
        return norm[tier]

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Model inputs for a window batch, exactly as the training job builds them."""
        return window_inputs(batch, cfg=self.cfg, vae=self.model.vae, text=self.text, vlm=self.model.vlm,
                             with_actions=True, device=self.device)


def check_export(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"model export '{p}' is not a folder")
    if (p / "export").is_dir() and not (p / "motus_config.json").exists():
        p = p / "export"  # a run dir: its export sub-folder
    missing = [f for f in REQUIRED_FILES if not (p / f).exists()]
    if missing:
        raise ExportError(f"model export '{p}' lacks {missing}; expected a `motus train` export "
                          f"(run_dir/export) with {list(REQUIRED_FILES)}")
    return p


def load_export(path: str | Path, params: Any, device: str | torch.device = "cpu") -> ExportedModel:
    """Load an export for inference. The window geometry comes from `params.data.window` + the model config."""
    p = check_export(path)
    try:
        lineage = LineageRecord.read(p)
    except ContractError as e:
        raise ExportError(str(e)) from None
    model = MotusModel.from_pretrained(p).to(device).eval()
    cfg = model.config
    if cfg.action.encoder_mode != "finetune" or lineage.stage_number == 1:
        raise ExportError(f"model export '{p}' is a Stage {lineage.stage_number or '?'} model (action expert "
                          f"'{cfg.action.encoder_mode}'): only a model trained on real actions (Stage 3) is a policy")
    w = cfg.weights or {}
    # frozen parts that neither ship with the export nor have a weights path would be fresh random ones
    if not w.get("vae") and not (p / "vae.safetensors").exists():
        raise ExportError(f"model export '{p}' has no vae.safetensors and its config names no VAE weights")
    if not w.get("vlm") and not (p / "vlm.safetensors").exists():
        model.vlm = None  # trained without the understanding expert's inputs
    seed = int(getattr(getattr(params, "project", None), "seed", 0))
    text = FrozenTextEncoder(cfg.video["text_dim"], w.get("text"), max_len=cfg.text_len, seed=seed + 2)
    if not w.get("text"):
        f = p / "text.safetensors"
        if not f.exists():
            raise ExportError(f"model export '{p}' has no text.safetensors and its config names no text weights")
        from safetensors.torch import load_file

        text.load_state_dict(load_file(str(f)))
    spec = window_spec_from_params(params.data.window, cfg, cfg.action.action_dim, cfg.action.state_dim)
    return ExportedModel(p, model, text.to(device), lineage, spec, torch.device(device))
