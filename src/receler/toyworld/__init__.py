"""The toy world: a tiny Stable-Diffusion-format model, its data, detector and prompt sets."""

from __future__ import annotations

from receler.toyworld.detector import DetectorConfig, ToyDetector, load_detector, save_detector
from receler.toyworld.model import (
    SamplerDefaults,
    TextConfig,
    UNetConfig,
    VAEConfig,
    default_model_path,
    default_sampler_settings,
)
from receler.toyworld.prompts import prompt_file, write_prompt_sets
from receler.toyworld.render import (
    SceneConfig,
    SceneSpec,
    render_scene,
    sample_scene,
    scene_from_seed,
)
from receler.toyworld.vocab import CLASSES, COLOURS, STYLES, SYNONYMS

__all__ = [
    "CLASSES",
    "COLOURS",
    "STYLES",
    "SYNONYMS",
    "DetectorConfig",
    "SamplerDefaults",
    "SceneConfig",
    "SceneSpec",
    "TextConfig",
    "ToyDetector",
    "UNetConfig",
    "VAEConfig",
    "default_model_path",
    "default_sampler_settings",
    "load_detector",
    "prompt_file",
    "render_scene",
    "sample_scene",
    "save_detector",
    "scene_from_seed",
    "write_prompt_sets",
]
