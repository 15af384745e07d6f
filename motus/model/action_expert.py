"""The action expert: a DiT-style stack with its own timestep embedding and AdaLN, one block per Wan layer."""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (
    FeedForward,
    JointProjection,
    full_precision,
    layer_norm,
    silu_mlp,
    sincos_positions,
    timestep_sinusoid,
)
from .presets import ActionExpertConfig


class ActionEncoder(nn.Module):
    """Embeds the action-side sequence.

    finetune: [state, a_1..a_K, registers] (real robot actions and proprioception, Stage 3);
    pretrain: [a_1..a_K] (latent actions only, no state, no registers, Stage 2).
    """

    def __init__(self, cfg: ActionExpertConfig):
        super().__init__()
        self.mode = cfg.encoder_mode
        self.action_in = silu_mlp(cfg.action_dim, cfg.dim, 3)
        if self.mode == "finetune":
            self.state_in = silu_mlp(cfg.state_dim, cfg.dim, 3)
            self.registers = nn.Parameter(torch.empty(1, cfg.num_registers, cfg.dim).normal_(std=0.02))
            n = 1 + cfg.chunk + cfg.num_registers
        elif self.mode == "pretrain":
            self.state_in = None
            self.registers = None
            n = cfg.chunk
        else:
            raise ValueError(f"unknown action encoder mode '{self.mode}'; expected 'finetune' or 'pretrain'")
        self.register_buffer("positions", sincos_positions(n, cfg.dim)[None], persistent=False)

    def forward(self, actions: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        tokens = self.action_in(actions).to(self.registers.dtype if self.registers is not None
                                            else self.action_in[0].weight.dtype)  # residual in the weights' dtype
        if self.mode == "finetune":
            if state is None:
                raise ValueError("the action expert is in finetune mode and needs `state` [B, state_dim]")
            regs = self.registers.expand(actions.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat([self.state_in(state)[:, None], tokens, regs], dim=1)
        return tokens + self.positions[:, : tokens.shape[1]].to(tokens.dtype)

    def action_slice(self, n_actions: int) -> slice:
        """Where the action tokens sit in the encoded sequence."""
        return slice(1, 1 + n_actions) if self.mode == "finetune" else slice(0, n_actions)


class ActionBlock(nn.Module):
    def __init__(self, cfg: ActionExpertConfig, heads: int, head_dim: int):
        super().__init__()
        self.eps = cfg.eps
        self.attn = JointProjection(cfg.dim, heads, head_dim, cfg.eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)
        # shift/scale/gate for attention, then for the FFN; added to the projected timestep embedding.
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def modulate(self, tproj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """tproj [B, 6, dim] -> six [B, 1, dim] tensors."""
        return tuple(m for m in (self.modulation + tproj.float()).chunk(6, dim=1))

    def attn_input(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]):
        shift, scale = mod[0], mod[1]
        h = (layer_norm(x, self.eps).float() * (1 + scale) + shift).type_as(x)
        return self.attn.project(h)

    def attn_residual(self, x: torch.Tensor, attn_out: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return (x.float() + self.attn.out(attn_out).float() * mod[2]).type_as(x)

    def ffn_residual(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h = (layer_norm(x, self.eps).float() * (1 + mod[4]) + mod[3]).type_as(x)
        return (x.float() + self.ffn(h).float() * mod[5]).type_as(x)


class ActionDecoder(nn.Module):
    """AdaLN head; its output layer starts at zero so a fresh expert predicts zero velocity."""

    def __init__(self, cfg: ActionExpertConfig):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.head = nn.Linear(cfg.dim, cfg.action_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + temb[:, None].float()).chunk(2, dim=1)
        return self.head((layer_norm(x, self.eps).float() * (1 + scale) + shift).type_as(x))


class ActionExpert(nn.Module):
    def __init__(self, cfg: ActionExpertConfig, heads: int, head_dim: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = ActionEncoder(cfg)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(ActionBlock(cfg, heads, head_dim) for _ in range(cfg.num_layers))
        self.decoder = ActionDecoder(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.decoder.head:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.time_embedding:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def embed_time(self, t_action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t_action [B] in [0, 1] -> (temb [B, dim], tproj [B, 6, dim])."""
        dtype = self.time_embedding[0].weight.dtype
        with full_precision(t_action.device):
            temb = self.time_embedding(timestep_sinusoid(t_action.float() * 1000.0, self.cfg.freq_dim).to(dtype))
            return temb, self.time_projection(temb).unflatten(1, (6, self.cfg.dim))
