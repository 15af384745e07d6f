"""The Motus network: video, action and understanding experts joined by tri-model joint attention.

The names below are imported on first use: `motus.model.presets` (a recipe's sizes, read by every CLI command
that resolves a stage) must not import diffusers and the three experts, which costs seconds per process.
"""

from typing import Any

# name -> "module:attribute" (the pipeline's code keys read these references as imports)
_WHERE = {
    "MODES": "motus.model.modes:MODES", "get_mode": "motus.model.modes:get_mode",
    "MotusModel": "motus.model.motus:MotusModel", "SampleResult": "motus.model.motus:SampleResult",
    "Velocity": "motus.model.motus:Velocity", "MotusConfig": "motus.model.presets:MotusConfig",
    "build_config": "motus.model.presets:build_config", "full": "motus.model.presets:full",
    "tiny": "motus.model.presets:tiny", "UnderstandingContext": "motus.model.vlm:UnderstandingContext",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        module, attr = _WHERE[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'motus.model' has no attribute {name!r}")
