"""The detector interface and a registry of detectors addressed by name.

A detector scores each asked label on each image; a label is *present* when its score is
at least the detector's ``threshold``. Registry entries are ``"module:attribute"``
strings imported on first use, so ``import receler.eval`` pulls in neither transformers
models nor onnxruntime.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class Detector(Protocol):
    """Scores labels on images."""

    name: str  # registry name, e.g. "toy"
    threshold: float  # a label is present when its score >= threshold

    def detect(self, images: list[Image.Image], labels: list[str]) -> list[dict[str, float]]:
        """Score every label on every image.

        Args:
            images: RGB images.
            labels: labels to score, the same for every image.

        Returns:
            One ``{label: score}`` dict per image, with exactly the asked labels.
        """
        ...


_REGISTRY: dict[str, str | Callable[..., Detector]] = {
    "toy": "receler.eval.detectors.toy:ToyDetector",
    "grounding-dino": "receler.eval.detectors.grounding_dino:GroundingDinoDetector",
    "nudenet": "receler.eval.detectors.nudenet:NudeNetDetector",
    "clip-score": "receler.eval.detectors.clip_score:ClipScoreDetector",
    "q16": "receler.eval.detectors.q16:Q16Detector",
}


def register_detector(name: str, factory: str | Callable[..., Detector]) -> None:
    """Register a detector factory (a callable, or a ``"module:attribute"`` string) under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"Detector name must be a non-empty string, got {name!r}.")
    _REGISTRY[name] = factory


def available_detectors() -> list[str]:
    """Registered detector names, sorted."""
    return sorted(_REGISTRY)


def get_detector(name: str, **kwargs) -> Detector:
    """Build the detector registered as ``name``.

    Args:
        name: one of ``available_detectors()``.
        **kwargs: passed to the detector's constructor (e.g. ``threshold=0.6``).

    Returns:
        The detector.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown detector {name!r}; choose one of {available_detectors()}.")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(**kwargs)


def check_labels(labels: list[str], known: list[str] | tuple[str, ...], detector: str) -> None:
    """Raise a ``ValueError`` naming the labels that ``detector`` cannot score."""
    unknown = [lb for lb in labels if lb not in known]
    if unknown:
        raise ValueError(f"Detector {detector!r} cannot score {unknown}; it knows {list(known)}.")


def batches(n: int, size: int) -> list[slice]:
    """Slices that split ``range(n)`` into chunks of at most ``size``."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}.")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def indices_by_size(images: list[Image.Image]) -> list[list[int]]:
    """Indices of ``images`` grouped by image size, in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    return list(groups.values())


def model_and_processor(model, processor, model_cls, processor_cls, what: str, device,
                        **from_pretrained_kwargs):
    """A transformers model and its processor, in eval mode on ``device``: loaded with
    ``from_pretrained`` when ``model`` is a hub id or folder, else ``model`` as given (then
    ``processor`` is required)."""
    if isinstance(model, str):
        processor = processor or processor_cls.from_pretrained(model, **from_pretrained_kwargs)
        model = model_cls.from_pretrained(model, **from_pretrained_kwargs)
    elif processor is None:
        raise ValueError(f"Pass processor= together with a loaded {what} model.")
    return model.to(device).eval(), processor
