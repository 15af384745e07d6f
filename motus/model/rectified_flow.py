"""Rectified flow with one timestep per modality.

x_t = (1 - t) x_0 + t eps, the network predicts v = eps - x_0. A clean modality sits at t = 0, a generated
one is integrated from t = 1 to 0, a "kept noisy" one stays at t = 1. Training draws t_video and t_action
independently, so every conditioning pattern (every mode) is seen during training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .presets import FlowConfig


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3/Wan time shift: pushes mass toward t = 1 (more noise) for shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


Generators = torch.Generator | list[torch.Generator] | None


def draw(kind: str, shape: tuple[int, ...], generator: Generators, device: torch.device | str = "cpu",
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.rand / torch.randn of `shape`. A list of generators (one per sample, diffusers' convention) draws
    each sample's row from its own generator, so a sample's noise does not depend on its batch-mates."""
    if kind == "zeros":  # the noise's mean: a deterministic start (`MotusModel.estimate_x0`)
        return torch.zeros(shape, device=device, dtype=dtype)
    fn = torch.rand if kind == "rand" else torch.randn
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: pass one per sample")
        return torch.cat([fn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return fn(shape, generator=generator, device=device, dtype=dtype)


def sample_timesteps(cfg: FlowConfig, n: int, generator: Generators = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    if cfg.timestep_sampler == "uniform_shift":
        return shift_time(draw("rand", (n,), generator, device), cfg.shift)
    if cfg.timestep_sampler == "logit_normal":
        z = draw("randn", (n,), generator, device) * cfg.logit_std + cfg.logit_mean
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


def window_action_mse(pred: torch.Tensor, target: torch.Tensor, dims: Sequence[int | None]) -> torch.Tensor:
    """Action MSE per window [B] over each window's real action dimensions (`dims[i]`: its tier's width, padding
    into the unified space excluded; None: all of them). Validation and evaluation score modes with it."""
    if pred.shape != target.shape:
        raise ValueError(f"predicted actions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
    err = (pred.float() - target.float()) ** 2
    return torch.stack([err[i, ..., :d].mean() if d else err[i].mean() for i, d in enumerate(dims)])
