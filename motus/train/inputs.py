"""Window batch -> model inputs: the one preprocessing path that training, validation and evaluation share.

A batch is what `motus.data.loader.collate_windows` returns (``video`` [B, 3, F, H, W] in [-1, 1], normalised
``actions`` / ``state`` or None, ``instruction`` strings). The frozen parts turn it into what `MotusModel`
takes: VAE latents, text embeddings, state fitted to the model's width, and the VLM's understanding tokens
of the conditioning frame. A closed-loop evaluator builds the same batch from a rendered observation, so a
policy sees exactly what the model saw in training. A batch read from the encoder cache already holds
``video_latents``, ``text_embeds`` and ``understanding``: computed by the same encoders, ahead of time.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.encoders import understanding_of


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
    if "video_latents" in batch:  # read from the encoder cache (`motus.data.encoded`): no decode, no encoder
        out: dict[str, Any] = {"video_latents": batch["video_latents"].to(device),
                               "text_embeds": batch["text_embeds"].to(device)}
        if vlm is not None:
            if batch.get("understanding") is None:
                raise ValueError("a cached batch without understanding features reached a stage that reads them")
            out["understanding"] = batch["understanding"].to(device)
    else:
        video = batch["video"].to(device)
        out = {"video_latents": vae.encode(video), "text_embeds": text(list(batch["instruction"]))}
        if vlm is not None:
            out["understanding"] = understanding_of(vlm, video, list(batch["instruction"]), cfg.vlm_image_size)
    if with_actions:
        if batch.get("actions") is not None:
            out["actions"] = batch["actions"].to(device)
        if cfg.action.encoder_mode == "finetune" and batch.get("state") is not None:
            out["state"] = fit_state(batch["state"], cfg.action.state_dim).to(device)
    return out
