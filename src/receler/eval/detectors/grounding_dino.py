"""Zero-shot object detection with GroundingDINO through transformers, as a ``Detector``.

This follows the Receler reference (``Cifar10GroundDINOEval``): each label is its own
caption (lower-cased, ending with ``"."``), a query is a box when its best token
probability exceeds the box threshold (0.5), and the label is present when there is any
box. The score of a label is therefore the best token probability over all queries, and
``score >= threshold`` marks it present (the reference uses ``>``; the two differ only when
a probability is exactly the threshold). The text threshold only selects the phrase of a
box, so it matters for ``boxes`` but not for presence. Images are batched only with
images of the same size, because padding a smaller image changes its backbone features.
"""

from __future__ import annotations

import torch
from PIL import Image

from receler.eval.detectors.base import batches, indices_by_size, model_and_processor

DEFAULT_GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"


def caption_for(label: str) -> str:
    """GroundingDINO caption of one label: lower case, stripped, ending with a period."""
    text = label.strip().lower()
    if not text:
        raise ValueError("GroundingDINO labels must be non-empty strings.")
    return text if text.endswith(".") else text + "."


class GroundingDinoDetector:
    """GroundingDINO scores: best box confidence per label (see the module docstring)."""

    name = "grounding-dino"

    def __init__(
        self,
        model: str | torch.nn.Module = DEFAULT_GROUNDING_DINO,
        *,
        processor=None,
        box_threshold: float = 0.5,
        text_threshold: float = 0.5,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        **from_pretrained_kwargs,
    ):
        """Args:
        model: hub id or local folder of a GroundingDINO checkpoint, or a loaded
            ``GroundingDinoForObjectDetection`` (then pass ``processor`` too).
        processor: a ``GroundingDinoProcessor``; ``None`` loads it from ``model``.
        box_threshold: box confidence at which a label counts as present.
        text_threshold: token probability that selects a box's phrase (``boxes`` only).
        device: where the model runs.
        batch_size: images per forward pass.
        **from_pretrained_kwargs: e.g. ``local_files_only=True``.
        """
        for name, v in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 < v < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {v}.")
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.model, self.processor = model_and_processor(
            model, processor, AutoModelForZeroShotObjectDetection, AutoProcessor, "GroundingDINO",
            device, **from_pretrained_kwargs)
        self.device = torch.device(device)
        self.threshold = box_threshold
        self.text_threshold = text_threshold
        self.batch_size = batch_size

    @torch.no_grad()
    def _forward(self, images: list[Image.Image], caption: str):
        inputs = self.processor(
            images=[im.convert("RGB") for im in images],
            text=[caption] * len(images),
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        return inputs, self.model(**inputs)

    def detect(self, images: list[Image.Image], labels: list[str]) -> list[dict[str, float]]:
        """Best box confidence of each label on each image (see ``Detector.detect``)."""
        results: list[dict[str, float]] = [{} for _ in images]
        # Batch only images of one size: padding a smaller image changes its backbone features.
        for label in labels:
            caption = caption_for(label)
            for idx in indices_by_size(images):
                for sl in batches(len(idx), self.batch_size):
                    _, out = self._forward([images[i] for i in idx[sl]], caption)
                    # Text positions past the caption have logit -inf, i.e. probability 0.
                    best = out.logits.float().sigmoid().amax(dim=(1, 2))  # (B,)
                    for i, score in zip(idx[sl], best.tolist(), strict=True):
                        results[i][label] = score
        return results

    def boxes(self, image: Image.Image, label: str) -> dict:
        """Boxes of ``label`` on ``image``: ``{"scores", "boxes" (x0, y0, x1, y1 pixels), "text_labels"}``."""
        inputs, out = self._forward([image], caption_for(label))
        return self.processor.post_process_grounded_object_detection(
            out,
            inputs["input_ids"],
            threshold=self.threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
