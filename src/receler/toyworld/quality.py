"""Quality measurements of a toy pipeline with the toy detector.

Shared by ``scripts/toyworld/measure.py`` (full bars, written to JSON and Markdown) and
``tests/test_toyworld_quality.py`` (a reduced version). Each prompt set is generated with
the stock ``StableDiffusionPipeline`` call, one seeded generator per row
(``evaluation_seed``), and scored by the detector at a probability threshold of 0.5.
"""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from receler.toyworld.render import scene_from_seed

THRESHOLD = 0.5  # detector probability counted as "present"

# Quality bars of the shipped base model (issue #3).
BARS = {
    "simple_class_rate": (">=", 0.90),
    "paraphrase_class_rate": (">=", 0.80),
    "two_object_both_rate": (">=", 0.70),
    "style_rate_with_word": (">=", 0.80),
    "style_rate_without_word": ("<=", 0.10),
    "detector_accuracy_fresh": (">=", 0.98),
    "seconds_per_100_images": ("<=", 60.0),
}


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a prompt CSV as dicts (columns by name)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def subsample(
    rows: list[dict], per_group: int | None, keys: tuple[str, ...] = ("class",)
) -> list[dict]:
    """At most ``per_group`` rows per value of ``keys``, evenly spaced within each group.

    Groups keep their file order; ``None`` keeps every row.
    """
    if per_group is None:
        return rows
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for g in groups.values():
        idx = sorted(set(np.linspace(0, len(g) - 1, min(per_group, len(g))).round().astype(int)))
        out += [g[i] for i in idx]
    return out


@torch.no_grad()
def generate(
    pipe, rows: list[dict], settings: dict, *, batch_size: int = 100, progress: bool = True
) -> np.ndarray:
    """Images (N, H, W, 3) float in [0, 1] for the rows' prompts and seeds."""
    out = []
    it = range(0, len(rows), batch_size)
    for i in tqdm(it, desc="generate", disable=not progress):
        chunk = rows[i : i + batch_size]
        gens = [torch.Generator().manual_seed(int(r["evaluation_seed"])) for r in chunk]
        res = pipe(
            [r["prompt"] for r in chunk],
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            height=settings["height"],
            width=settings["width"],
            generator=gens,
            output_type="np",
        )
        out.append(res.images)
    return np.concatenate(out)


def _probs(det, images: np.ndarray) -> dict[str, torch.Tensor]:
    return det.predict(torch.from_numpy(images).permute(0, 3, 1, 2).float())  # (N, 3, H, W)


def score_classes(
    det, images: np.ndarray, rows: list[dict], columns: tuple[str, ...] = ("class",)
) -> float:
    """Fraction of images where every class named in ``columns`` is detected."""
    p = _probs(det, images)["class_probs"]
    ok = torch.ones(len(rows), dtype=torch.bool)
    for col in columns:
        idx = torch.tensor([det.classes.index(r[col]) for r in rows])
        ok &= p[torch.arange(len(rows)), idx] > THRESHOLD
    return ok.float().mean().item()


def score_style(det, images: np.ndarray, rows: list[dict]) -> dict[str, float]:
    """Style detection rate on rows with a ``style`` and on rows without one."""
    p = _probs(det, images)["style_probs"]
    with_word, without = [], []
    for i, r in enumerate(rows):
        if r["style"]:
            with_word.append(p[i, det.styles.index(r["style"])].item() > THRESHOLD)
        else:
            without.append((p[i] > THRESHOLD).any().item())
    return {
        "style_rate_with_word": float(np.mean(with_word)),
        "style_rate_without_word": float(np.mean(without)),
    }


def detector_accuracy(det, n: int = 1000, *, seed_base: int = 4 * 10**8) -> float:
    """Exact-match accuracy (class set and style) on ``n`` freshly rendered scenes."""
    imgs, truth = [], []
    for i in range(n):
        img, spec, _ = scene_from_seed(seed_base + i)
        imgs.append(np.asarray(img, np.float32) / 255)
        truth.append((set(spec.classes), {spec.style} - {None}))
    p = _probs(det, np.stack(imgs))
    correct = 0
    for i, (cls, sty) in enumerate(truth):
        pc = {c for c, v in zip(det.classes, p["class_probs"][i], strict=True) if v > THRESHOLD}
        ps = {s for s, v in zip(det.styles, p["style_probs"][i], strict=True) if v > THRESHOLD}
        correct += pc == cls and ps == sty
    return correct / n


def time_generation(pipe, settings: dict, n: int = 100) -> float:
    """Seconds to generate ``n`` images in one batch (after a short warm-up)."""
    rng = random.Random(0)
    from receler.toyworld.vocab import CLASSES

    prompts = [f"a photo of a {rng.choice(CLASSES)}" for _ in range(n)]
    pipe(prompts[:2], num_inference_steps=2, output_type="np")  # warm-up
    t0 = time.perf_counter()
    pipe(
        prompts,
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        height=settings["height"],
        width=settings["width"],
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return time.perf_counter() - t0


def check_bars(metrics: dict[str, float]) -> dict[str, bool]:
    """Which bars the measured metrics meet (metrics absent from ``metrics`` are skipped)."""
    out = {}
    for k, (op, v) in BARS.items():
        if k in metrics:
            out[k] = metrics[k] >= v if op == ">=" else metrics[k] <= v
    return out
