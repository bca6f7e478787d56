"""CLIP score, ``max(100 * cos(image, text), 0)``, through transformers, as a ``Detector``.

The score of a label is the CLIP score between the image and the label's text, so asking
for a row's prompt gives the usual prompt-image CLIP score (``score_pairs`` does that for
one prompt per image). CLIP scores have no natural presence threshold: ``threshold`` is
only used where a metric asks whether a label is present; report ``mean_score`` otherwise.
"""

from __future__ import annotations

import torch
from PIL import Image

from receler.eval.detectors.base import batches, model_and_processor

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ClipScoreDetector:
    """CLIP score of each label text on each image."""

    name = "clip-score"

    def __init__(
        self,
        model: str | torch.nn.Module = DEFAULT_CLIP,
        *,
        processor=None,
        threshold: float = 20.0,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        **from_pretrained_kwargs,
    ):
        """Args:
        model: hub id or local folder of a CLIP checkpoint, or a loaded ``CLIPModel``
            (then pass ``processor`` too).
        processor: a ``CLIPProcessor``; ``None`` loads it from ``model``.
        threshold: CLIP score at which a label counts as present (0-100 scale; the
            default 20 is a convention, not a calibrated value).
        device: where the model runs.
        batch_size: images (and texts) per forward pass.
        **from_pretrained_kwargs: e.g. ``local_files_only=True``.
        """
        if not 0.0 < threshold <= 100.0:
            raise ValueError(f"threshold must be a CLIP score in (0, 100], got {threshold}.")
        from transformers import CLIPModel, CLIPProcessor

        self.model, self.processor = model_and_processor(
            model, processor, CLIPModel, CLIPProcessor, "CLIP", device, **from_pretrained_kwargs)
        self.device = torch.device(device)
        self.threshold = threshold
        self.batch_size = batch_size

    @torch.no_grad()
    def _scores(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        """CLIP scores of every image against every text, ``(len(images), len(texts))``."""
        inputs = self.processor(
            text=texts,
            images=[im.convert("RGB") for im in images],
            return_tensors="pt",
            padding=True,
            truncation=True,  # long prompts keep their first tokens, as in torchmetrics
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(self.device)
        out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # (N, D)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # (T, D)
        return (100.0 * img @ txt.T).clamp(min=0.0).cpu()

    def detect(self, images: list[Image.Image], labels: list[str]) -> list[dict[str, float]]:
        """CLIP score of every label on every image (see ``Detector.detect``)."""
        if not labels:
            return [{} for _ in images]
        results: list[dict[str, float]] = []
        for sl in batches(len(images), self.batch_size):
            s = self._scores(images[sl], list(labels))
            results += [dict(zip(labels, row.tolist(), strict=True)) for row in s]
        return results

    def score_pairs(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        """CLIP score of each image with its own text (``texts[i]`` goes with ``images[i]``)."""
        if len(images) != len(texts):
            raise ValueError(
                f"score_pairs needs one text per image, got {len(images)} images and {len(texts)} texts."
            )
        scores: list[float] = []
        for sl in batches(len(images), self.batch_size):
            scores += torch.diagonal(self._scores(images[sl], texts[sl])).tolist()
        return scores
