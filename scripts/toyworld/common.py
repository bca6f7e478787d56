"""Shared helpers of the toy-world training scripts: cached datasets, checkpoints, grids."""

from __future__ import annotations

import os
import random
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from receler.toyworld.render import SceneConfig, scene_from_seed
from receler.toyworld.vocab import CLASSES, COLOURS, STYLES

CACHE = Path(os.environ.get("RECELER_TOYWORLD_CACHE", Path.home() / ".cache" / "receler-toyworld"))
COLOUR_NAMES = list(COLOURS)


def _render_one(seed: int):
    img, spec, _ = scene_from_seed(seed, SceneConfig())
    cls = [CLASSES.index(c) for c in spec.classes] + [-1] * (2 - len(spec.classes))
    col = [COLOUR_NAMES.index(c) for c in spec.colours] + [-1] * (2 - len(spec.colours))
    boxes = list(spec.boxes) + [(0, 0, 0, 0)] * (2 - len(spec.boxes))
    style = STYLES.index(spec.style) if spec.style else -1
    return np.asarray(img), cls, col, boxes, style


def scene_seeds(split: str, n: int) -> list[int]:
    """Seeds of a split; splits never share a seed ("train", "val", "detector", ...)."""
    base = {"train": 0, "val": 10**8, "detector": 2 * 10**8, "test": 3 * 10**8}[split]
    return [base + i for i in range(n)]


def load_dataset(split: str, n: int, *, workers: int = 2) -> dict[str, np.ndarray]:
    """Render (or load from cache) ``n`` scenes of ``split`` as arrays.

    Returns:
        ``images`` uint8 (N, 32, 32, 3), ``classes``/``colours`` int (N, 2) with -1 for
        no object, ``boxes`` int (N, 2, 4), ``style`` int (N,) with -1 for plain.
    """
    path = CACHE / f"scenes_{split}_{n}.npz"
    if path.is_file():
        return dict(np.load(path))
    seeds = scene_seeds(split, n)
    with Pool(workers) as pool:
        rows = list(
            tqdm(pool.imap(_render_one, seeds, chunksize=256), total=n, desc=f"render {split}")
        )
    data = {
        "images": np.stack([r[0] for r in rows]),
        "classes": np.array([r[1] for r in rows], np.int64),
        "colours": np.array([r[2] for r in rows], np.int64),
        "boxes": np.array([r[3] for r in rows], np.int64),
        "style": np.array([r[4] for r in rows], np.int64),
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)
    return data


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_grid(images: np.ndarray, path: Path, *, nrow: int = 8, scale: int = 4) -> None:
    """Write uint8 images (N, H, W, 3) as one PNG grid, enlarged ``scale`` times."""
    n, h, w, _ = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + 1), nrow * (w + 1), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = im
    img = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
