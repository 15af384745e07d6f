"""Training precision: a setting, resolved once per job, never sniffed from the device inside the loop.

`bf16` means what the official Motus code does: the module's weights stay fp32 (they are the master weights the
optimizer updates), the forward runs under `torch.autocast(dtype=bfloat16)`, the timestep sinusoids and time
MLPs run with autocast switched off (`motus.model.layers.full_precision`), and losses are reduced in fp32. So
DeepSpeed is configured WITHOUT its own `bf16` section: that mode casts the module's parameters to bf16, and
inputs that stay fp32 then fail at the first matmul (the step-0 crash this replaces). CPU autocast supports
bf16, so the exact GPU code path runs in the CPU tests.

`auto` resolves to bf16 on CUDA and fp32 elsewhere. The resolved value (never `auto`) is what a checkpoint
records; resuming with another one is a named error (`check_resume`), because the optimizer state and the
loss trajectory belong to the precision they were produced under.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

SETTINGS = ("auto", "bf16", "fp32")
RESOLVED = ("bf16", "fp32")


class PrecisionError(ValueError):
    """A precision that cannot be used here; the message names the setting and the allowed values."""


def bf16_supported(device: torch.device) -> bool:
    """Whether this device can train in bf16. CUDA: Ampere or newer. CPU: always - PyTorch's CPU kernels
    compute bf16 on every CPU it runs on (natively with AVX512-BF16/AMX, otherwise by widening to fp32 and
    rounding back, slower but with bf16's numerics). Asking oneDNN for native support instead made the same
    test pass on one CI machine and fail on the next; precision is a configuration, not a property of the
    machine the tests happen to run on."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu"


def resolve(setting: str | None, device: torch.device, *, source: str = "precision",
            supported: bool | None = None) -> str:
    """`auto` | `bf16` | `fp32` (None = auto) -> `bf16` | `fp32` for this device, or PrecisionError.

    `source` names where the value came from (`--precision`, `stages.stage3.precision`) for the message;
    `supported` overrides the hardware probe (tests)."""
    setting = setting or "auto"
    if setting not in SETTINGS:
        hint = " (fp16 needs loss scaling and is not supported; use bf16)" if setting == "fp16" else ""
        raise PrecisionError(f"{source}: '{setting}' is not a precision; allowed: {', '.join(SETTINGS)}{hint}")
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if setting == "bf16":
        ok = bf16_supported(device) if supported is None else supported
        if not ok:
            raise PrecisionError(f"{source}: bf16 was requested but this {device.type} device has no bf16 support; "
                                 f"use fp32 (or auto). Never a silent fallback to another precision.")
    return setting


def setting_for(params: Any, section: Any, override: str | None, section_key: str) -> tuple[str, str]:
    """(setting, where it came from): the command line, else the job's own section (`section_key`, e.g.
    `stages.stage3`), else the global `precision` key."""
    if override is not None:
        return override, "--precision"
    own = getattr(section, "precision", None)
    if own is not None:
        return own, f"{section_key}.precision"
    return getattr(params, "precision", "auto"), "precision"


def preflight(params: Any, section: Any, override: str | None, section_key: str) -> str:
    """Resolve a job's precision on this machine before any process starts, so a bad value or bf16 on a
    device without it fails at the command line, named, instead of inside every worker."""
    setting, source = setting_for(params, section, override, section_key)
    return resolve(setting, torch.device("cuda" if torch.cuda.is_available() else "cpu"), source=source)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's mixed-precision context: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_resume(recorded: str | None, precision: str, checkpoint: Any) -> None:
    """Refuse to resume a checkpoint written under another precision, naming both."""
    if recorded is not None and recorded != precision:
        raise PrecisionError(
            f"{checkpoint} was written with precision {recorded}; this job runs {precision}. Resume with "
            f"--precision {recorded}, or start a new --run-dir with --init-from its export to change precision "
            f"(the export holds fp32 weights, which either precision can start from).")
