"""receler: reliable concept erasing in text-to-image diffusion models with lightweight erasers."""

__version__ = "0.1.0"

from .config import EraserConfig, TrainConfig  # noqa: E402
from .erasers import (  # noqa: E402
    Eraser,
    attach_erasers,
    erasers_disabled,
    get_erasers,
    remove_erasers,
    set_erasers_enabled,
)
from .generate import SamplerSettings, compare, generate  # noqa: E402
from .pipeline import load_pipeline  # noqa: E402
from .serialization import load_erasers, save_erasers  # noqa: E402
from .train import Trainer, TrainingDiverged, TrainingInterrupted, erase  # noqa: E402

__all__ = [
    "Eraser", "EraserConfig", "SamplerSettings", "TrainConfig", "Trainer", "TrainingDiverged",
    "TrainingInterrupted", "attach_erasers", "compare", "erase", "erasers_disabled", "generate",
    "get_erasers", "load_erasers", "load_pipeline", "remove_erasers", "save_erasers",
    "set_erasers_enabled",
]
