"""receler: reliable concept erasing in text-to-image diffusion models with lightweight erasers.

The public API is re-exported here lazily, so that ``import receler`` (and the CLI's
input checks) does not pay for importing diffusers and transformers until needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "EraserConfig": "config", "TrainConfig": "config", "model_erase_defaults": "config",
    "Eraser": "erasers", "attach_erasers": "erasers", "erasers_disabled": "erasers",
    "get_erasers": "erasers", "remove_erasers": "erasers", "set_erasers_enabled": "erasers",
    "SamplerSettings": "sampling", "compare": "sampling", "generate": "sampling",
    "generate_prompt_file": "sampling",
    "load_pipeline": "pipeline",
    "load_erasers": "serialization", "save_erasers": "serialization",
    "Trainer": "train", "TrainingDiverged": "train", "TrainingInterrupted": "train",
    "erase": "train",
    "erase_with": "methods", "load_edit": "methods", "remove_edit": "methods",
    "edit_disabled": "methods",
    "Protocol": "protocol", "ProtocolConfig": "protocol",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'receler' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return [*globals(), *__all__]
