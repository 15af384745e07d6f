"""The DeepSpeed part every train module shares (the stage job and the latent-action VAE job): the engine's
config from a job's batch, clipping, ZeRO stage and offload, and resuming from the latest complete checkpoint.

No DeepSpeed "bf16" section, whatever the precision: it would cast the module to bf16. bf16 here is autocast over
fp32 master weights (`motus.train.precision`), so the engine, its gradients and the optimizer states stay fp32
and a checkpoint restores on either precision's code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointManifest, find_latest_complete, load_checkpoint
from .precision import check_resume


def deepspeed_config(section: str, *, batch_size: int, world: int, grad_clip: float, zero_stage: int,
                     offload_optimizer: bool = False, pin_memory: bool = False) -> dict[str, Any]:
    """The engine config of a job: `section` names the params.yaml section in errors."""
    if batch_size % world:
        raise ValueError(f"{section}.batch_size={batch_size} must be divisible by the {world} processes")
    cfg: dict[str, Any] = {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,  # clipping lives in the engine, where DeepSpeed applies it
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        # the optimizer partition and its step run on the host; torch's AdamW does that step (DeepSpeed's
        # CPUAdam would need a compiled op), which DeepSpeed allows only with this flag
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


@dataclass
class Resumed:
    checkpoint: Path | None  # None: a fresh start
    step: int = 0
    wall_seconds: float = 0.0


def resume_latest(engine: Any, run_dir: Path, *, precision: str, config_hash: str) -> Resumed:
    """Restore the latest complete checkpoint of `run_dir` into the engine, if there is one. Refuses, naming
    both, a checkpoint of another precision or another config."""
    latest = find_latest_complete(Path(run_dir) / "checkpoints")
    if latest is None:
        return Resumed(None)
    check_resume(CheckpointManifest.read(latest).extra.get("precision"), precision, latest)
    m = load_checkpoint(engine, latest)
    if m.config_hash != config_hash:
        raise ValueError(f"{latest} was written with config {m.config_hash[:12]}, this job's is {config_hash[:12]}: "
                         "resume only runs the same config (use a new --run-dir)")
    return Resumed(latest, m.step, m.wall_seconds)
