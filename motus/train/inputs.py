"""Window batch -> model inputs: the one preprocessing path that training, validation and evaluation share.

A batch is what `motus.data.loader.collate_windows` returns (``video`` [B, 3, F, H, W] in [-1, 1], normalised
``actions`` / ``state`` or None, ``instruction`` strings). The frozen parts turn it into what `MotusModel`
takes: VAE latents, text embeddings, state fitted to the model's width, and the VLM's understanding tokens
of the conditioning frame. A closed-loop evaluator builds the same batch from a rendered observation, so a
policy sees exactly what the model saw in training.
"""

from __future__ import annotations

from typing import Any

import torch


def fit_state(state: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad (or cut) state [B, S] to the model's state width."""
    if state.shape[1] < width:
        state = torch.nn.functional.pad(state, (0, width - state.shape[1]))
    return state[:, :width]


def window_inputs(batch: dict[str, Any], *, cfg: Any, vae: Any, text: Any, vlm: Any | None, with_actions: bool,
                  device: torch.device) -> dict[str, Any]:
    """`MotusModel.training_loss` / `sample` keyword inputs for a window batch.

    `with_actions`: the stage reads actions (and, in finetune mode, state); a batch without actions (a
    closed-loop observation) still gets its state.
    """
    video = batch["video"].to(device)
    out: dict[str, Any] = {"video_latents": vae.encode(video), "text_embeds": text(list(batch["instruction"]))}
    if with_actions:
        if batch.get("actions") is not None:
            out["actions"] = batch["actions"].to(device)
        if cfg.action.encoder_mode == "finetune" and batch.get("state") is not None:
            out["state"] = fit_state(batch["state"], cfg.action.state_dim).to(device)
    if vlm is not None:
        first = (video[:, :, 0].float().clamp(-1, 1) + 1) / 2
        out["understanding"] = vlm.encode(vlm.prepare(first.cpu(), list(batch["instruction"]), cfg.vlm_image_size))
    return out
