"""Small building blocks shared by the action and understanding experts."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[..] float timesteps (0..1000 scale) -> [.., dim] cos/sin features (Wan's flip_sin_to_cos layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off: timestep sinusoids and time MLPs stay fp32 under bf16 mixed precision, as the
    official code keeps them (t * 1000 in bf16 would quantise t by ~0.5 %)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def sincos_positions(n: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin/cos position table [n, dim] for the action sequence (no RoPE on non-video tokens)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def silu_mlp(in_features: int, out_features: int, depth: int) -> nn.Sequential:
    """Linear, then (SiLU, Linear) x (depth-1): the projector used by the encoders and adapters."""
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm in fp32 (the experts' norms carry no weights; AdaLN supplies scale/shift)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class JointProjection(nn.Module):
    """An expert's own Q/K/V into, and output projection out of, the shared joint-attention head space.

    Each expert has its own width; the joint attention runs in the video expert's head space
    (heads x head_dim), so every expert projects there with its own weights and RMS-normalises Q and K
    across heads, as Wan does for video tokens.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.norm_q(q.float()), self.norm_k(k.float())  # QK-norm in fp32 under bf16 autocast too
        shape = (*x.shape[:2], self.heads, self.head_dim)
        return q.view(shape), k.view(shape), v.view(shape)
