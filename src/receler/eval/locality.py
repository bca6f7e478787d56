"""How much the images an erasure should leave alone changed, beyond what a detector names.

Acc_L says whether the detector still names the other classes; it does not see a circle
that turned from orange to maroon, or a background that darkened. With the same prompts and
seeds, the base model's and the edited model's images of the other classes can be compared
image by image:

* ``pixel``: mean |base − edited| over the RGB values (0-1) of each image pair, averaged
  (0: unchanged; a flat colour shift of 0.1 everywhere gives 0.1), with ``pixel_max``, the
  largest image's;
* ``feature``: mean cosine distance between the detector's penultimate features of each
  pair (0: the detector sees the same thing), and ``feature_fd``, the Fréchet distance
  between the two feature sets. Features need a detector that has them (the toy world's);
  with another detector these are ``None``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def other_class_images(rows, concepts: str | list[str], folder: Path) -> list[str]:
    """Names (``{case}_{index}.png``) of the images in ``folder`` of the rows whose class is
    none of ``concepts`` (every concept the model erased: a multi-concept model's other
    erased classes are meant to change; rows without a class, such as style rows, are left
    out)."""
    left_out = {concepts} if isinstance(concepts, str) else set(concepts)
    cases = {r.case_number for r in rows if r.class_name and r.class_name not in left_out}
    names = []
    for path in sorted(Path(folder).glob("*_*.png")):
        case, _, index = path.stem.rpartition("_")
        if case.isdigit() and index.isdigit() and int(case) in cases:
            names.append(path.name)
    return names


def features_of(detector):
    """A callable images -> (N, D) features for ``detector`` (the protocol's ``Detector``
    or a toy detector itself), or ``None`` when it has no features to give."""
    from .detectors.toy import ToyDetector
    from .fid import ToyFeatures

    inner = detector.detector if isinstance(detector, ToyDetector) else detector
    try:
        return ToyFeatures(inner)
    except (TypeError, AttributeError):
        return None


def image_change(base: Path, edited: Path, names: list[str], features=None) -> dict | None:
    """How the images ``names`` differ between ``base`` and ``edited`` (same prompts and
    seeds); ``None`` when no name is in both folders.

    Returns:
        ``n`` (pairs), ``pixel``, ``pixel_max``, ``feature`` and ``feature_fd`` (``None``
        without ``features``; ``feature_fd`` also below two pairs).
    """
    from .fid import fid_from_features

    base, edited = Path(base), Path(edited)
    pairs = [n for n in names if (base / n).is_file() and (edited / n).is_file()]
    if not pairs:
        return None
    a = [Image.open(base / n).convert("RGB") for n in pairs]
    b = [Image.open(edited / n).convert("RGB") for n in pairs]
    pixel = [float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() / 255)
             for x, y in zip(a, b, strict=True)]
    out = {"n": len(pairs), "pixel": float(np.mean(pixel)), "pixel_max": float(np.max(pixel)),
           "feature": None, "feature_fd": None}
    if features is not None:
        fa, fb = np.asarray(features(a), np.float64), np.asarray(features(b), np.float64)
        norms = np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1)
        cos = (fa * fb).sum(axis=1) / np.maximum(norms, 1e-12)
        out["feature"] = float(np.mean(1.0 - cos))
        if len(pairs) >= 2:
            out["feature_fd"] = max(float(fid_from_features(fa, fb)), 0.0)
    return out


def run_image_change(run: Path, res: dict, features: dict | None = None) -> dict | None:
    """The other classes' image change of a finished ``receler protocol`` run: what the
    protocol recorded (``image_change_others``), else measured from the run's images and
    its base model's, for runs made before the protocol recorded it; ``None`` without
    images. ``features`` (a dict) caches each detector's feature extractor across runs;
    without it only the pixel change is measured."""
    recorded = res.get("image_change_others")
    # recorded before the other erased concepts were left out: measured again
    if recorded and (len(res.get("erased") or []) <= 1 or "left_out" in recorded):
        return recorded
    from .prompts import read_prompts

    given = res.get("config", {}).get("prompts")  # the prompt files it used (None = toy)
    if given:
        simple = Path(given["simple"])
    else:
        from ..protocol import PromptSets

        simple = PromptSets.toy().simple
    erased = Path(run) / "images" / "erased" / "simple"
    if not res.get("base_images") or not erased.is_dir():
        return None
    erased_concepts = res.get("erased") or [res["concept"]]
    names = other_class_images(read_prompts(simple), erased_concepts, erased)
    if not names:
        return None
    extractor = None
    if features is not None:
        detector = res.get("detector") or "toy"
        if detector not in features:
            from .detectors import get_detector

            features[detector] = features_of(get_detector(detector)) if detector == "toy" \
                else None
        extractor = features[detector]
    change = image_change(Path(res["base_images"]) / "simple", erased, names, extractor)
    return change and {**change, "left_out": sorted(erased_concepts)}
