"""Detectors behind one interface, built by name with ``get_detector``."""

from receler.eval.detectors.base import (
    Detector,
    available_detectors,
    get_detector,
    register_detector,
)
from receler.eval.detectors.evaluate import (
    default_labels,
    evaluate_folder,
    evaluate_images,
    prompt_label,
)

__all__ = [
    "Detector",
    "available_detectors",
    "default_labels",
    "evaluate_folder",
    "evaluate_images",
    "get_detector",
    "prompt_label",
    "register_detector",
]
