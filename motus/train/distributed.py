"""The process group a training job runs in: torchrun (local) or the PyTorchJob's pods (kubernetes) set it up;
every train module (stage, latent-action VAE) joins it the same way."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..contracts import device_hours

PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "B200": 2250e12}  # dense bf16, per device


@dataclass
class JobContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    nodes: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    device_type: str = "cpu"



def init_distributed() -> JobContext:
    """Join the process group torchrun (or the DeepSpeed launcher) set up; a bare process becomes a world of 1."""
    import deepspeed

    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cuda:
        torch.cuda.set_device(local_rank)
        name = torch.cuda.get_device_name(local_rank)
        device_type = next((k for k in PEAK_FLOPS if k in name), name)
        device = torch.device("cuda", local_rank)
    else:
        device_type, device = "cpu", torch.device("cpu")
        # processes on one machine share its cores; oversubscription slows every process many times over. An
        # OMP_NUM_THREADS set by whoever started the job (a scheduler, a test runner) knows more about the machine's
        # other work than this process does, so it wins.
        given = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(given) if given.isdigit() and int(given) > 0
                              else max(1, (os.cpu_count() or 1) // local_world))
    return JobContext(rank, world, local_rank, max(1, world // local_world), device, device_type)


def mean_across_ranks(values: dict[str, float], ctx: JobContext) -> dict[str, float]:
    if ctx.world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world for k, v in zip(keys, t.tolist(), strict=True)}


def job_hours(ctx: JobContext, wall_seconds: float) -> float:
    """The device-hours of this job so far: every process's device for the whole wall time."""
    return device_hours(ctx.nodes, ctx.world // ctx.nodes, wall_seconds)


def accounting(ctx: JobContext, wall_seconds: float, params: Any) -> tuple[dict[str, float], dict[str, str]]:
    """The metrics (device and wall hours, cost where the device has a price) and tags a finished job logs."""
    hours = job_hours(ctx, wall_seconds)
    metrics = {"cost/device_hours": hours, "cost/wall_hours": wall_seconds / 3600}
    price = params.costs.device_hour.get(ctx.device_type)
    if price is None:
        logging.getLogger("motus.train").warning(
            "no price for device '%s' in costs.device_hour: cost not computed", ctx.device_type)
    else:
        metrics["cost/amount"] = hours * price
    tags = {"device_type": ctx.device_type, "devices": str(ctx.world), "currency": params.costs.currency}
    return metrics, tags
