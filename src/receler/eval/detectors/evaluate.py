"""Run a detector over generated images and collect ``ImageRecord``s for the metrics.

Images are named ``{case_number}_{index}.png`` after the prompt row they come from. Each
image is asked about the labels its row names (``default_labels``: the ``class``,
``class2`` and ``style`` cells) plus any ``extra_labels`` (e.g. the erased concept, so
that it is scored on every image). Images that ask for the same labels are batched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from receler.eval.detectors.base import Detector, batches
from receler.eval.metrics import ImageRecord
from receler.eval.prompts import PromptRow, list_images, read_prompts

logger = logging.getLogger(__name__)


def default_labels(row: PromptRow) -> list[str]:
    """Labels a row names: its ``class``, ``class2`` and ``style`` cells, when not empty."""
    found = [row.class_name, row.extra.get("class2"), row.extra.get("style")]
    return list(dict.fromkeys(lb for lb in found if lb))


def prompt_label(row: PromptRow) -> list[str]:
    """The row's prompt as the only label (for CLIP score)."""
    return [row.prompt]


def evaluate_images(
    items: Sequence[tuple[PromptRow, int, Image.Image | str | Path]],
    detector: Detector,
    *,
    labels_for: Callable[[PromptRow], list[str]] = default_labels,
    extra_labels: Sequence[str] = (),
    batch_size: int = 16,
) -> list[ImageRecord]:
    """Score images with ``detector``.

    Args:
        items: ``(row, index, image)`` triples; ``image`` is a PIL image or a file path.
        detector: any ``Detector``.
        labels_for: labels to ask for each row (default: ``default_labels``).
        extra_labels: labels asked on every image as well.
        batch_size: images loaded and passed to the detector at once.

    Returns:
        One ``ImageRecord`` per item, in the order of ``items``.
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, (row, _, _) in enumerate(items):
        labels = tuple(dict.fromkeys([*labels_for(row), *extra_labels]))
        if not labels:
            raise ValueError(
                f"Prompt row {row.case_number} asks for no label; give the prompt file a 'class' "
                "column, or pass labels_for= or extra_labels=."
            )
        groups.setdefault(labels, []).append(i)
    records: list[ImageRecord | None] = [None] * len(items)
    for labels, idx in groups.items():
        for sl in batches(len(idx), batch_size):
            chunk = idx[sl]
            images = [_load(items[i][2]) for i in chunk]
            scores = detector.detect(images, list(labels))
            for i, s in zip(chunk, scores, strict=True):
                row, index, image = items[i]
                path = None if isinstance(image, Image.Image) else str(image)
                records[i] = ImageRecord(row, index, dict(s), detector.threshold, path)
    return records  # type: ignore[return-value]


def _load(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def evaluate_folder(
    folder: str | Path,
    prompts: str | Path | list[PromptRow],
    detector: Detector,
    *,
    labels_for: Callable[[PromptRow], list[str]] = default_labels,
    extra_labels: Sequence[str] = (),
    batch_size: int = 16,
) -> list[ImageRecord]:
    """Score every ``{case_number}_{index}.<ext>`` image in ``folder``.

    Args:
        folder: folder of generated images; other files are ignored.
        prompts: the prompt file the images were generated from, or its rows.
        detector, labels_for, extra_labels, batch_size: as in ``evaluate_images``.

    Returns:
        One ``ImageRecord`` per image, sorted by (case_number, index).
    """
    rows = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    by_case = {r.case_number: r for r in rows}
    found = list_images(folder)
    if not found:
        raise ValueError(f"No images named {{case_number}}_{{index}}.png in {folder}.")
    unknown = sorted({case for case, _, _ in found if case not in by_case})
    if unknown:
        raise ValueError(
            f"{len(unknown)} image case number(s) in {folder} are not in the prompt file "
            f"(first: {unknown[:5]}); pass the prompt file the images were generated from."
        )
    missing = len(by_case) - len({case for case, _, _ in found})
    if missing:
        logger.warning("%d prompt row(s) have no image in %s", missing, folder)
    items = [(by_case[case], index, path) for case, index, path in found]
    return evaluate_images(
        items, detector, labels_for=labels_for, extra_labels=extra_labels, batch_size=batch_size
    )
