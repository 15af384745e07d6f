"""A model export, loaded for inference: the network, its frozen parts, lineage, and its window geometry.

An export (what `motus.train.stage.StageJob.export` writes) holds `motus_config.json` + `model.safetensors`,
the frozen VAE/VLM/text encoder when they have no local weights path, the lineage record (tiers and their
action/state normalisation) and, for a policy, its serving contract (camera layout, action spaces, hold).
Everything the evaluator and the policy server feed the model is built through
`motus.train.inputs.window_inputs`, the function training uses, and one observation becomes one action chunk
in `ExportedModel.plan`, for the closed-loop evaluation and `motus serve` alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import WindowConfig
from ..contracts import LINEAGE_FILE, ContractError, LineageRecord, ServingContract
from ..data.loader import WindowSpec, denormalize_actions, frames_to_video, normalize, window_spec_from_params
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
    serving: ServingContract | None = None

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

    def plan(self, frame: np.ndarray, state: np.ndarray, instruction: str, tier: str, *, mode: str = "vla",
             generator: torch.Generator | None = None, steps: int | None = None, actions: np.ndarray | None = None,
             with_frames: bool = False) -> Plan:
        """One observation -> one action chunk in the robot's units (and, `with_frames`, the predicted future
        frames): frame [h, w, 3] uint8 of the trained view, state [state_dim] raw, `tier` the action space.
        wm mode takes the chunk's raw `actions` [K, action_dim] and predicts frames only."""
        return self.plan_batch([Observation(frame, state, instruction, generator, actions)], tier, mode=mode,
                               steps=steps, with_frames=with_frames)[0]

    @torch.no_grad()
    def plan_batch(self, observations: list[Observation], tier: str, *, mode: str = "vla", steps: int | None = None,
                   with_frames: bool = False) -> list[Plan]:
        """`plan` for several observations of one action space at once; each row's noise comes from its own
        generator, so a row's answer does not depend on its batch-mates (up to floating-point summation order)."""
        cfg = self.cfg
        video_only = mode == "vgm"  # a Stage 1 model: no state, no action tokens at all
        norm = None if video_only else self.normalization(tier)
        # an observation is a window's conditioning frame. Wan's VAE is causal (latent frame 0 is a function of
        # pixel frame 0 alone: bit-identical), and vla/joint replace the future latents with noise, so the
        # one-frame clip is encoded and the future latent slots are placeholders the sampler never reads
        st = None if video_only else normalize(np.stack([np.asarray(o.state, dtype=np.float32) for o in observations]),
                                               norm["method"], norm.get("state"))
        video = torch.stack([frames_to_video(np.asarray(o.frame)[None], (cfg.height, cfg.width))
                             for o in observations])
        batch = {"video": video, "actions": None, "state": None if st is None else torch.from_numpy(st),
                 "instruction": [o.instruction for o in observations]}
        inputs = self.inputs(batch)
        obs = inputs["video_latents"][:, :, :1]
        future = obs.new_zeros(*obs.shape[:2], cfg.latent_shape[1] - 1, *obs.shape[3:])
        given = None
        if mode == "wm":
            a = normalize(np.stack([np.asarray(o.actions, dtype=np.float32) for o in observations]), norm["method"],
                          norm.get("actions"))
            a = np.pad(a, ((0, 0), (0, 0), (0, cfg.action.action_dim - a.shape[-1])))  # the loader's zero padding
            given = torch.from_numpy(a).to(self.device)
        gens = [o.generator for o in observations]
        generator = gens[0] if len(gens) == 1 else (None if all(g is None for g in gens) else
                                                   [g if g is not None else torch.Generator(device=self.device)
                                                    for g in gens])
        out = self.model.sample(mode, torch.cat([obs, future], dim=2), inputs["text_embeds"], actions=given,
                                state=None if video_only else inputs.get("state"),
                                understanding=inputs.get("understanding"), steps=steps, generator=generator,
                                action_stream=not video_only)
        raw = [None] * len(observations)
        if out.actions is not None and mode in ("vla", "joint"):
            chunk = np.asarray(denormalize_actions(out.actions.float().cpu().numpy(), norm), dtype=np.float64)
            if not np.isfinite(chunk).all():  # never hand a robot NaN: the caller fails loudly instead
                raise FloatingPointError(f"the model returned non-finite actions ({int((~np.isfinite(chunk)).sum())} "
                                         f"of {chunk.size})")
            raw = list(chunk)
        frames = [None] * len(observations)
        if (with_frames or video_only) and out.video_latents is not None and mode in ("wm", "joint", "vgm"):
            decoded = (self.model.vae.decode(out.video_latents) + 1) / 2  # [B, 3, F, H, W] in [0, 1]
            if not torch.isfinite(decoded).all():
                raise FloatingPointError("the model returned non-finite frames")
            pixels = (decoded[:, :, 1:].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
            frames = list(pixels.cpu().numpy())
        return [Plan(actions=a, frames=f) for a, f in zip(raw, frames, strict=True)]


@dataclass
class Observation:
    """One request's inputs to `ExportedModel.plan_batch`: the trained view's frame [h, w, 3] uint8, the raw
    state, the instruction, its noise generator and, for wm, the chunk's raw actions [K, action_dim]."""

    frame: np.ndarray
    state: np.ndarray
    instruction: str
    generator: torch.Generator | None = None
    actions: np.ndarray | None = None


@dataclass
class Plan:
    """What one observation gave: the action chunk [K, action_dim] in the robot's units (None in wm and vgm
    modes), and the predicted future frames [F, H, W, 3] uint8 when asked for (wm, joint) and in vgm mode."""

    actions: np.ndarray | None
    frames: np.ndarray | None = None


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


def load_export(path: str | Path, params: Any = None, device: str | torch.device = "cpu", *,
                policy: bool = True) -> ExportedModel:
    """Load an export for inference. The window geometry comes from the model config and `params.data.window`,
    or, without params (a server far from the project), the export's serving contract. `policy`: refuse a model
    that was not trained on real actions (False: a Stage 1 video model, served for its video)."""
    p = check_export(path)
    try:
        lineage = LineageRecord.read(p)
    except ContractError as e:
        raise ExportError(str(e)) from None
    model = MotusModel.from_pretrained(p).to(device).eval()
    cfg = model.config
    if policy and (cfg.action.encoder_mode != "finetune" or lineage.stage_number == 1):
        raise ExportError(f"model export '{p}' is a Stage {lineage.stage_number or '?'} model (action expert "
                          f"'{cfg.action.encoder_mode}'): only a model trained on real actions (Stage 3) is a policy")
    w = cfg.weights or {}
    # frozen parts that neither ship with the export nor have a weights path would be fresh random ones
    if not w.get("vae") and not (p / "vae.safetensors").exists():
        raise ExportError(f"model export '{p}' has no vae.safetensors and its config names no VAE weights")
    if not w.get("vlm") and not (p / "vlm.safetensors").exists():
        model.vlm = None  # trained without the understanding expert's inputs
    # the text encoder's seed only draws the tiny preset's random base, which the export ships (loaded below)
    seed = int(getattr(getattr(params, "project", None), "seed", 0))
    text = FrozenTextEncoder(cfg.video["text_dim"], w.get("text"), max_len=cfg.text_len, seed=seed + 2)
    if not w.get("text"):
        f = p / "text.safetensors"
        if not f.exists():
            raise ExportError(f"model export '{p}' has no text.safetensors and its config names no text weights")
        from safetensors.torch import load_file

        text.load_state_dict(load_file(str(f)))
    serving = None
    if ServingContract.exists(p):
        try:
            serving = ServingContract.read(p)
        except ContractError as e:
            raise ExportError(str(e)) from None
    if params is None and serving is None:
        raise ExportError(f"model export '{p}' has no serving contract (serving.json): pass the project's params "
                          "for its window geometry")
    window = params.data.window if params is not None else WindowConfig()
    if serving is not None:  # the hold the model was trained with, whatever params.yaml says now
        window = window.model_copy(update={"downsample": serving.hold})
    spec = window_spec_from_params(window, cfg, cfg.action.action_dim, cfg.action.state_dim)
    return ExportedModel(p, model, text.to(device), lineage, spec, torch.device(device), serving)
