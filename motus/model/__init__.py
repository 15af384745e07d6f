"""The Motus network: video, action and understanding experts joined by tri-model joint attention."""

from .modes import MODES, get_mode
from .motus import MotusModel, SampleResult, Velocity
from .presets import MotusConfig, build_config, full, tiny
from .vlm import UnderstandingContext

__all__ = ["MODES", "MotusConfig", "MotusModel", "SampleResult", "UnderstandingContext", "Velocity",
           "build_config", "full", "get_mode", "tiny"]
