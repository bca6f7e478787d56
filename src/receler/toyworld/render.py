"""Procedural renderer of toy scenes: one or two coloured shapes on a light background.

A scene is sampled from a seed (``sample_scene``), then drawn (``render_scene``) by
supersampling: each shape's mask is drawn with PIL at ``SUPERSAMPLE`` times the final
size, the fill (plain or striped) is composited through it, and the image is reduced
with a box filter, which antialiases the edges. Objects are large (at least 12 px in a
32 px image) so that their shape survives the VAE's 2x downsampling to a 16x16 latent.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from receler.toyworld.vocab import CLASSES, COLOURS, STYLES, make_caption

SUPERSAMPLE = 4  # shapes are drawn at this multiple of the image size, then reduced


@dataclass
class SceneSpec:
    """Ground truth of one scene."""

    classes: list[str]  # object classes, one or two
    colours: list[str]  # colour name per object
    boxes: list[tuple[int, int, int, int]]  # (x0, y0, x1, y1) per object, pixels, x1/y1 exclusive
    style: str | None  # global style of the scene (``None`` for plain)
    background: tuple[
        tuple[int, int, int], tuple[int, int, int], str
    ]  # (rgb, rgb2, "h"|"v"|"solid")
    stripe_phase: int = 0  # offset of the stripes, supersampled pixels
    size: int = 32  # image size in pixels
    extra: dict = field(default_factory=dict)  # free-form metadata


@dataclass
class SceneConfig:
    """Distribution of scenes."""

    size: int = 32  # image side in pixels
    p_two: float = 0.5  # probability of a two-object scene
    p_style: float = 0.25  # probability of the "striped" style
    single_size: tuple[int, int] = (16, 26)  # min/max side of a lone object, pixels
    pair_size: tuple[int, int] = (12, 16)  # min/max side of each object in a pair, pixels


def _light_colour(rng: random.Random) -> tuple[int, int, int]:
    """A pale background colour."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.82, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def sample_scene(
    rng: random.Random,
    cfg: SceneConfig | None = None,
    *,
    classes: list[str] | None = None,
    colours: list[str] | None = None,
    style: str | None | bool = False,
) -> SceneSpec:
    """Sample a scene; ``classes``/``colours``/``style`` fix those parts when given.

    ``style=False`` (default) samples the style; ``None`` forces plain; a name forces it.
    """
    cfg = cfg or SceneConfig()
    n = len(classes) if classes else (2 if rng.random() < cfg.p_two else 1)
    if classes is None:
        classes = rng.sample(CLASSES, n)
    if colours is None:
        colours = rng.sample(list(COLOURS), n)
    if style is False:
        style = rng.choice(STYLES) if rng.random() < cfg.p_style else None
    s = cfg.size
    boxes = []
    if n == 1:
        side = rng.randint(*cfg.single_size)
        x0, y0 = rng.randint(1, s - 1 - side), rng.randint(1, s - 1 - side)
        boxes.append((x0, y0, x0 + side, y0 + side))
    else:
        # Split the image in two halves (left/right or top/bottom), one object per half.
        horizontal = rng.random() < 0.5
        half = s // 2
        for i in range(2):
            side = rng.randint(*cfg.pair_size)
            along = rng.randint(i * half, (i + 1) * half - side) if side < half else i * half
            across = rng.randint(1, s - 1 - side)
            x0, y0 = (along, across) if horizontal else (across, along)
            boxes.append((x0, y0, x0 + side, y0 + side))
    kind = rng.choice(["solid", "solid", "h", "v"])
    background = (_light_colour(rng), _light_colour(rng), kind)
    return SceneSpec(
        classes=list(classes),
        colours=list(colours),
        boxes=boxes,
        style=style,
        background=background,
        stripe_phase=rng.randrange(6 * SUPERSAMPLE),
        size=s,
    )


def _polygon(points: list[tuple[float, float]], box: tuple[float, float, float, float]):
    """Map unit-square points ([0, 1]^2) into ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    return [(x0 + px * (x1 - x0), y0 + py * (y1 - y0)) for px, py in points]


def _star_points(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = 0.5 if k % 2 == 0 else 0.5 * inner
        a = -math.pi / 2 + k * math.pi / n
        pts.append((0.5 + r * math.cos(a), 0.55 + r * math.sin(a)))
    return pts


def _heart_points(n: int = 60) -> list[tuple[float, float]]:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((0.5 + x / 34.0, 0.45 - y / 34.0))
    return pts


_UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(0.05, 0.05), (0.95, 0.05), (0.95, 0.95), (0.05, 0.95)],
    "triangle": [(0.5, 0.02), (0.98, 0.95), (0.02, 0.95)],
    "star": _star_points(),
    "heart": _heart_points(),
    "cross": [
        (0.34, 0.0),
        (0.66, 0.0),
        (0.66, 0.34),
        (1.0, 0.34),
        (1.0, 0.66),
        (0.66, 0.66),
        (0.66, 1.0),
        (0.34, 1.0),
        (0.34, 0.66),
        (0.0, 0.66),
        (0.0, 0.34),
        (0.34, 0.34),
    ],
    "diamond": [(0.5, 0.0), (0.88, 0.5), (0.5, 1.0), (0.12, 0.5)],
    "arrow": [
        (0.0, 0.36),
        (0.5, 0.36),
        (0.5, 0.08),
        (1.0, 0.5),
        (0.5, 0.92),
        (0.5, 0.64),
        (0.0, 0.64),
    ],
}


def _draw_mask(draw: ImageDraw.ImageDraw, cls: str, box: tuple[float, float, float, float]) -> None:
    """Draw the shape of ``cls`` filling ``box`` in white onto an "L" mask."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if cls == "circle":
        draw.ellipse(box, fill=255)
    elif cls == "ring":
        draw.ellipse(box, fill=255)
        t = 0.27
        draw.ellipse((x0 + t * w, y0 + t * h, x1 - t * w, y1 - t * h), fill=0)
    elif cls == "moon":
        draw.ellipse(box, fill=255)
        draw.ellipse((x0 + 0.35 * w, y0 - 0.1 * h, x1 + 0.35 * w, y1 - 0.1 * h), fill=0)
    else:
        draw.polygon(_polygon(_UNIT_POLYGONS[cls], box), fill=255)


@functools.lru_cache(maxsize=64)
def _stripes(big: int, phase: int) -> np.ndarray:
    """Boolean (big, big) mask of diagonal stripes with a period of 6 output pixels."""
    yy, xx = np.mgrid[0:big, 0:big]
    return ((xx + yy + phase) // (3 * SUPERSAMPLE)) % 2 == 1


def render_scene(spec: SceneSpec) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``spec.size`` pixels."""
    S = SUPERSAMPLE
    big = spec.size * S
    c1, c2, kind = spec.background
    if kind == "solid":
        bg = np.broadcast_to(np.array(c1, np.float32), (big, big, 3)).copy()
    else:
        t = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None]
        t = t[:, :, None] if kind == "v" else t.T[:, :, None]  # (big, 1, 1) or (1, big, 1)
        bg = (1 - t) * np.array(c1, np.float32) + t * np.array(c2, np.float32)
        bg = np.broadcast_to(bg, (big, big, 3)).copy()
    img = bg
    stripes = _stripes(big, spec.stripe_phase)
    for cls, colour, box in zip(spec.classes, spec.colours, spec.boxes, strict=True):
        mask_img = Image.new("L", (big, big), 0)
        _draw_mask(ImageDraw.Draw(mask_img), cls, tuple(v * S for v in box))
        mask = np.asarray(mask_img, np.float32)[:, :, None] / 255.0  # (big, big, 1)
        fill = np.broadcast_to(np.array(COLOURS[colour], np.float32), (big, big, 3)).copy()
        if spec.style == "striped":
            fill[stripes] = 0.4 * fill[stripes] + 0.6 * 255.0  # pale stripes keep the silhouette
        img = img * (1 - mask) + fill * mask
    # Box filter: average each S x S block.
    small = img.reshape(spec.size, S, spec.size, S, 3).mean(axis=(1, 3))  # (size, size, 3)
    return Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8), "RGB")


def scene_from_seed(
    seed: int, cfg: SceneConfig | None = None
) -> tuple[Image.Image, SceneSpec, str]:
    """Deterministic (image, ground truth, caption) for ``seed``."""
    rng = random.Random(seed)
    spec = sample_scene(rng, cfg)
    caption = make_caption(rng, list(zip(spec.classes, spec.colours, strict=True)), spec.style)
    return render_scene(spec), spec, caption


def render_batch(
    seeds: list[int], cfg: SceneConfig | None = None
) -> tuple[np.ndarray, list[SceneSpec]]:
    """Render many scenes: uint8 array (N, size, size, 3) and their ground truth."""
    imgs, specs = [], []
    for s in seeds:
        img, spec, _ = scene_from_seed(s, cfg)
        imgs.append(np.asarray(img))
        specs.append(spec)
    return np.stack(imgs), specs
