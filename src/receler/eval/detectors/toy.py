"""The toy world's shape/style classifier as a ``Detector``."""

from __future__ import annotations

import torch
from PIL import Image

from receler.eval.detectors.base import batches, check_labels, indices_by_size


class ToyDetector:
    """Scores toy classes and styles with the toy world's detector.

    The wrapped object needs ``classes`` and ``styles`` (label names) and
    ``predict(images) -> {"class_probs": (N, n_classes), "style_probs": (N, n_styles)}``.
    """

    name = "toy"

    def __init__(self, detector=None, *, threshold: float = 0.5, batch_size: int = 256):
        """Args:
        detector: a loaded toy detector; ``None`` loads ``receler.toyworld.load_detector()``.
        threshold: probability at which a class or style counts as present.
        batch_size: images per ``predict`` call.
        """
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1], got {threshold}.")
        if detector is None:
            from receler.toyworld import load_detector

            detector = load_detector()
        self.detector = detector
        self.threshold = threshold
        self.batch_size = batch_size

    @property
    def labels(self) -> list[str]:
        """Every label this detector can score: classes, then styles."""
        return [*self.detector.classes, *self.detector.styles]

    @torch.no_grad()
    def detect(self, images: list[Image.Image], labels: list[str]) -> list[dict[str, float]]:
        """Probability of each asked class or style on each image (see ``Detector.detect``)."""
        check_labels(labels, self.labels, self.name)
        column = {c: ("class_probs", i) for i, c in enumerate(self.detector.classes)}
        column.update({s: ("style_probs", i) for i, s in enumerate(self.detector.styles)})
        results: list[dict[str, float]] = [{} for _ in images]
        for idx in indices_by_size(images):  # the toy detector stacks a batch into one tensor
            for sl in batches(len(idx), self.batch_size):
                chunk = idx[sl]
                out = self.detector.predict([images[i].convert("RGB") for i in chunk])
                probs = {
                    k: torch.as_tensor(out[k]).float().cpu() for k in ("class_probs", "style_probs")
                }
                for row, i in enumerate(chunk):
                    results[i] = {
                        lb: float(probs[column[lb][0]][row, column[lb][1]]) for lb in labels
                    }
        return results
