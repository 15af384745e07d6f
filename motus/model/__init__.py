"""The Motus network: video, action and understanding experts joined by tri-model joint attention.

The names below are imported on first use: `motus.model.presets` (a recipe's sizes, read by every CLI command
that resolves a stage) must not import diffusers and the three experts, which costs seconds per process.
"""

from typing import Any

_WHERE = {"MODES": "modes", "get_mode": "modes", "MotusModel": "motus", "SampleResult": "motus",
          "Velocity": "motus", "MotusConfig": "presets", "build_config": "presets", "full": "presets",
          "tiny": "presets", "UnderstandingContext": "vlm"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"motus.model.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'motus.model' has no attribute {name!r}")
