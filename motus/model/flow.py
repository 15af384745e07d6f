"""Rectified flow with one timestep per modality.

x_t = (1 - t) x_0 + t eps, the network predicts v = eps - x_0. A clean modality sits at t = 0, a generated
one is integrated from t = 1 to 0, a "kept noisy" one stays at t = 1. Training draws t_video and t_action
independently, so every conditioning pattern (every mode) is seen during training.
"""

from __future__ import annotations

import torch

from .presets import FlowConfig


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3/Wan time shift: pushes mass toward t = 1 (more noise) for shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(cfg: FlowConfig, n: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    if cfg.timestep_sampler == "uniform_shift":
        u = torch.rand(n, generator=generator, device=device)
        return shift_time(u, cfg.shift)
    if cfg.timestep_sampler == "logit_normal":
        z = torch.randn(n, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
        return torch.sigmoid(z)
    raise ValueError(f"unknown timestep sampler '{cfg.timestep_sampler}'; expected 'uniform_shift' or 'logit_normal'")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t broadcast from [B] over the remaining dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def inference_schedule(steps: int, shift: float) -> torch.Tensor:
    """steps+1 decreasing times from 1 to 0 for Euler integration."""
    if steps < 1:
        raise ValueError(f"inference steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1), shift)
