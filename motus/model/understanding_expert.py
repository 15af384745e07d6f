"""The understanding expert: carries the frozen VLM's last hidden states into every joint attention layer."""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import FeedForward, JointProjection, layer_norm, silu_mlp
from .presets import UnderstandingExpertConfig


class UnderstandingBlock(nn.Module):
    def __init__(self, cfg: UnderstandingExpertConfig, heads: int, head_dim: int):
        super().__init__()
        self.eps = cfg.eps
        self.attn = JointProjection(cfg.dim, heads, head_dim, cfg.eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)

    def attn_input(self, x: torch.Tensor):
        return self.attn.project(layer_norm(x, self.eps))

    def attn_residual(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        return x + self.attn.out(attn_out)

    def ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(layer_norm(x, self.eps))


class UnderstandingExpert(nn.Module):
    """No timestep (its tokens are always clean), no decoder (nothing is generated from it)."""

    def __init__(self, cfg: UnderstandingExpertConfig, heads: int, head_dim: int):
        super().__init__()
        self.cfg = cfg
        self.adapter = silu_mlp(cfg.vlm_hidden, cfg.dim, cfg.adapter_depth)
        self.blocks = nn.ModuleList(UnderstandingBlock(cfg, heads, head_dim) for _ in range(cfg.num_layers))
