"""Tri-model joint attention: one SDPA over the concatenated tokens [video | action | understanding]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding (Wan's layout): x [B, L, H, D], cos/sin [1, L, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)


def joint_attention(
    qkvs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    key_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Attend over the concatenation of every modality's tokens; return each modality's slice.

    qkvs: per modality (q, k, v), each [B, L_i, H, D]. key_mask: [B, sum L_i] bool, True = attend
    (padding of the VLM tokens is False, so no real token ever reads a pad token).
    Returns per modality [B, L_i, H*D].
    """
    lengths = [q.shape[1] for q, _, _ in qkvs]
    q = torch.cat([t[0] for t in qkvs], dim=1).transpose(1, 2)
    k = torch.cat([t[1] for t in qkvs], dim=1).transpose(1, 2)
    v = torch.cat([t[2] for t in qkvs], dim=1).transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).flatten(2)
    return list(out.split(lengths, dim=1))
