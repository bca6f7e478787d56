"""Shared helpers of the toy-world training scripts: cached datasets, checkpoints, grids.

Checkpoints are safetensors files with JSON metadata, written atomically
(``receler.serialization``); nothing is unpickled. Convert ``.pt`` checkpoints of older
runs with ``python scripts/toyworld/convert_checkpoints.py``.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import sys
from multiprocessing import Pool
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from receler.serialization import optimizer_tensors, read_tensors, restore_optimizer, save_tensors
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


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with keys ``{prefix}.{key}``."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict stored under ``prefix`` by :func:`prefixed`."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _is_json(obj) -> bool:
    try:
        json.dumps(obj)
    except (TypeError, ValueError):
        return False
    return True


def jsonable(obj):
    """``obj`` as plain JSON types (paths become strings, tuples lists)."""
    return json.loads(json.dumps(obj, default=str))


def scheduler_meta(state: dict) -> dict:
    """An LR scheduler's state_dict as JSON.

    Entries that are not JSON are callables the constructor sets again, so they are dropped;
    ``lr_lambdas`` entries that are not JSON become None (the lambda keeps its state).
    """
    out = {}
    for k, v in state.items():
        if k == "lr_lambdas":
            v = [fn if _is_json(fn) else None for fn in v]
        if _is_json(v):
            out[k] = v
    return out


def python_rng_json(state: tuple) -> list:
    """``random.getstate()`` as a JSON list."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def python_rng_state(obj: list) -> tuple:
    """Inverse of :func:`python_rng_json`, for ``random.setstate``."""
    version, internal, gauss = obj
    return (version, tuple(internal), gauss)


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


def rng_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a :func:`rng_state` dict into tensors and JSON."""
    name, keys, pos, has_gauss, gauss = state["numpy"]
    tensors = {
        "rng.torch": state["torch"],
        "rng.numpy": torch.from_numpy(np.asarray(keys, np.int64)),
    }
    meta = {"numpy": [name, pos, has_gauss, gauss], "python": python_rng_json(state["python"])}
    return tensors, meta


def rng_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`rng_tensors`, for :func:`set_rng_state`."""
    name, pos, has_gauss, gauss = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    return {
        "torch": tensors["rng.torch"],
        "numpy": (name, keys, pos, has_gauss, gauss),
        "python": python_rng_state(meta["python"]),
    }


def training_state(models: dict[str, nn.Module], opt, sched, **meta) -> tuple[dict, dict]:
    """Tensors and JSON of models (keys ``{name}.*``), optimizer, scheduler and global RNGs."""
    tensors = {}
    for name, model in models.items():
        tensors.update(prefixed(name, model.state_dict()))
    opt_t, opt_meta = optimizer_tensors(opt, "opt")
    rng_t, rng_meta = rng_tensors(rng_state())
    meta = {**meta, "opt": opt_meta, "sched": scheduler_meta(sched.state_dict()), "rng": rng_meta}
    return {**tensors, **opt_t, **rng_t}, meta


def restore_training_state(tensors: dict, meta: dict, models: dict[str, nn.Module], opt, sched):
    """Load what :func:`training_state` saved back into the objects and the global RNGs."""
    for name, model in models.items():
        model.load_state_dict(unprefixed(tensors, name))
    restore_optimizer(opt, "opt", tensors, meta["opt"])
    sched.load_state_dict(meta["sched"])
    set_rng_state(rng_from_tensors(tensors, meta["rng"]))


def _refuse_legacy(path: Path) -> None:
    legacy = path if path.suffix == ".pt" else path.with_suffix(".pt")
    if legacy == path or (not path.is_file() and legacy.is_file()):
        sys.exit(
            f"error: {legacy} is a legacy pickle checkpoint; convert it first with "
            f"`python scripts/toyworld/convert_checkpoints.py {legacy}`"
        )


def has_checkpoint(path: Path) -> bool:
    """Whether ``path`` exists; exits with the converter command if only a legacy .pt does."""
    _refuse_legacy(path)
    return path.is_file()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a safetensors checkpoint with JSON ``meta``, atomically."""
    save_tensors(path, tensors, meta)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint` (nothing is unpickled)."""
    _refuse_legacy(path)
    return read_tensors(path)


def cached_tensor(path: Path, make) -> torch.Tensor:
    """The tensor cached in ``path`` (safetensors), else ``make()`` cached there.

    A cache left by older scripts as ``.pt`` (one plain tensor) is read with the restricted
    ``torch.load(weights_only=True)`` and rewritten as safetensors.
    """
    if path.is_file():
        return read_tensors(path)[0]["tensor"]
    legacy = path.with_suffix(".pt")
    x = torch.load(legacy, weights_only=True) if legacy.is_file() else make()
    save_tensors(path, {"tensor": x})
    return x


def _legacy_safe_globals() -> list:
    """The exact types a legacy checkpoint needs beyond tensors: numpy's RNG key array, Path args."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct, pathlib.PosixPath]


def convert_legacy(path: Path, *, overwrite: bool = False) -> Path:
    """Convert a legacy ``torch.save`` checkpoint to ``<same name>.safetensors``; return that path.

    The legacy file is read with the restricted loader (``weights_only=True``) and kept.
    """
    path = Path(path)
    dest = path.with_suffix(".safetensors")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists (pass --overwrite to replace it)")
    with torch.serialization.safe_globals(_legacy_safe_globals()):
        ck = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(ck, dict) or "opt" not in ck:
        raise ValueError(f"{path} is not a training checkpoint (no optimizer state)")
    tensors, meta = {}, {}
    for k, v in ck.items():
        if k == "opt":  # optimizer_tensors only calls .state_dict()
            t, meta[k] = optimizer_tensors(SimpleNamespace(state_dict=lambda v=v: v), "opt")
        elif k == "sched":
            t, meta[k] = {}, scheduler_meta(v)
        elif k == "rng":
            t, meta[k] = rng_tensors(v)
        elif k == "caption_rng":
            t, meta[k] = {}, python_rng_json(v)
        elif isinstance(v, dict) and v and all(torch.is_tensor(x) for x in v.values()):
            t = prefixed(k, v)
        else:
            t, meta[k] = {}, jsonable(v)
        tensors.update(t)
    save_checkpoint(dest, tensors, meta)
    return dest


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
