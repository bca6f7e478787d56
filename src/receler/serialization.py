"""Saving and loading erasers and training checkpoints, with safetensors only.

Every file is written to a temporary name in the same folder and renamed into
place, so an interrupted write never leaves a half-written file behind. Nothing
is ever unpickled: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import EraserConfig
from .erasers import (
    attach_erasers,
    check_act,
    check_site,
    eraser_dim,
    find_cross_attention,
    get_erasers,
    remove_erasers,
)

ERASERS_FILE = "erasers.safetensors"
CONFIG_FILE = "eraser_config.json"
CHECKPOINT_FILE = "checkpoint.safetensors"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None):
    """Atomically save tensors, with ``meta`` as JSON in the safetensors header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"receler": json.dumps(meta or {}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_tensors(path: Path, *, meta_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors` (``meta_only``: just its metadata, no
    tensors); a damaged file is a clear ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("receler", "{}"))
            tensors = {} if meta_only else {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is truncated or corrupted ({e}); write it again, or resume from another copy"
        ) from None
    return tensors, meta


def eraser_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Eraser weights keyed ``{attn2 name}.{down|up}.{weight|bias}``."""
    return {f"{name}.{k}": v for name, e in get_erasers(unet).items()
            for k, v in e.state_dict().items()}


def save_erasers(unet: nn.Module, out_dir: Path, config: EraserConfig) -> Path:
    """Write ``erasers.safetensors`` and ``eraser_config.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    erasers = get_erasers(unet)
    if not erasers:
        raise ValueError("this UNet has no erasers to save: attach or train them first")
    config.layers = {name: e.dim for name, e in erasers.items()}
    first = next(iter(erasers.values()))
    config.rank, config.site, config.act = first.rank, first.site, first.act
    save_tensors(out_dir / ERASERS_FILE, eraser_state(unet), {"format": "receler-erasers"})
    atomic_write(out_dir / CONFIG_FILE, config.save)
    return out_dir


def _expected_shapes(unet: nn.Module, rank: int, site: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, attn in find_cross_attention(unet).items():
        dim = eraser_dim(attn, site)
        shapes.update({f"{name}.down.weight": (rank, dim), f"{name}.down.bias": (rank,),
                       f"{name}.up.weight": (dim, rank), f"{name}.up.bias": (dim,)})
    return shapes


def read_eraser_weights(unet: nn.Module, path: Path) -> tuple[dict[str, torch.Tensor],
                                                             EraserConfig]:
    """An eraser set's weights and config, checked against ``unet``'s layers (nothing is
    attached): a file that does not fit is refused with the layer and the expected and found
    shapes. ``path``: folder with ``erasers.safetensors`` (and ``eraser_config.json``), or the
    file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / ERASERS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(
            f"no {ERASERS_FILE} in {folder}: pass the --out folder of a finished `receler erase`")
    tensors, _ = read_tensors(weights)
    config = EraserConfig.load(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    file_rank = next((v.shape[0] for k, v in tensors.items() if k.endswith("down.weight")), None)
    if file_rank is None:
        raise ValueError(f"{weights} holds no eraser weights: pass the --out folder of a "
                         "finished `receler erase`")
    if config is not None and config.rank != file_rank:
        raise ValueError(f"{folder / CONFIG_FILE} says rank {config.rank} but {weights} holds "
                         f"rank-{file_rank} erasers: the two files come from different runs; "
                         "copy both from the same --out folder")
    config = config or EraserConfig(rank=file_rank)
    check_site(config.site)
    check_act(config.act)
    expected = _expected_shapes(unet, file_rank, config.site)
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"eraser file {weights} has no weights for layer {key} "
                             f"(expected shape {shape}): it was trained for another UNet")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"eraser for layer {key} has shape {tuple(tensors[key].shape)}, "
                             f"this UNet expects {shape}: it was trained for another UNet")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"eraser file {weights} has weights for layer {extra[0]}, which this "
                         "UNet does not have: it was trained for another UNet")
    return tensors, config


def set_eraser_weights(erasers: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked weights (:func:`read_eraser_weights`) into attached erasers."""
    for name, eraser in erasers.items():
        eraser.load_state_dict({k: tensors[f"{name}.{k}"] for k in eraser.state_dict()})


def load_erasers(target, path: Path, *, replace: bool = False) -> EraserConfig:
    """Load an eraser set onto a pipeline (or a UNet).

    Everything is checked before any module changes (:func:`read_eraser_weights`).

    Args:
        target: a diffusers pipeline with a ``unet``, or the UNet itself.
        path: folder with ``erasers.safetensors`` (and ``eraser_config.json``), or the file.
        replace: remove erasers already attached instead of refusing.

    Returns:
        The eraser config that was saved with the weights.
    """
    unet = getattr(target, "unet", target)
    tensors, config = read_eraser_weights(unet, path)
    if get_erasers(unet):
        if not replace:
            raise ValueError("this UNet already has erasers: pass replace=True or call "
                             "remove_erasers(unet) first")
        remove_erasers(unet)
    set_eraser_weights(attach_erasers(unet, config.rank, site=config.site, act=config.act),
                       tensors)
    return config


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """Split an optimizer state into tensors (for safetensors) and JSON metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, k = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def check_out_dir(out_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber a folder that already holds erasers or a checkpoint."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder: choose another --out")
    holds = [n for n in (ERASERS_FILE, CHECKPOINT_FILE) if (out_dir / n).exists()]
    if resume:
        if not (work_dir(out_dir, overwrite=False, resume=True) / CHECKPOINT_FILE).is_file():
            raise FileNotFoundError(f"nothing to resume: {out_dir / CHECKPOINT_FILE} does not "
                                    "exist; drop --resume to start a new run")
    elif holds and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {holds[0]}: pass --overwrite to replace "
                              "it, --resume to continue it, or choose another --out")


# ------------------------------------------------------------------ replacing a result
# A run that replaces a finished result (``--overwrite``) writes into ``out_dir/.overwrite``
# and moves its files into place only once they all exist; until then the old result stays
# whole and loadable. The move takes the old config out first and puts the new one in last,
# so a kill during the move leaves a folder without eraser_config.json, which nothing loads,
# never one that mixes two runs. An interrupted replacing run resumes in its staging folder.
STAGING_DIR = ".overwrite"
RESULT_FILES = (CONFIG_FILE, ERASERS_FILE, "unet_edit.safetensors", CHECKPOINT_FILE,
                "train_log.jsonl", "loss_curves.png", "masks")


def _holds_result(out_dir: Path) -> bool:
    return any((out_dir / n).exists() for n in RESULT_FILES)


def work_dir(out_dir: Path, *, overwrite: bool, resume: bool) -> Path:
    """Where a run writes: ``out_dir``, or its staging folder when the run replaces a result
    (``overwrite``) or resumes a replacing run that was interrupted."""
    out_dir = Path(out_dir)
    staging = out_dir / STAGING_DIR
    if resume:
        return staging if (staging / CHECKPOINT_FILE).is_file() else out_dir
    if overwrite and _holds_result(out_dir):
        return staging
    return out_dir


def start_work_dir(out_dir: Path, work: Path) -> None:
    """Make ``work`` ready for a new run (an old staging folder is cleared)."""
    import shutil

    if work != Path(out_dir) and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)


def commit_work_dir(out_dir: Path, work: Path) -> None:
    """Move a finished replacing run from ``work`` into ``out_dir`` (no-op when they agree)."""
    import shutil

    out_dir, work = Path(out_dir), Path(work)
    if work == out_dir:
        return
    replaced = out_dir / ".replaced"
    if replaced.exists():
        shutil.rmtree(replaced)
    replaced.mkdir()
    old = [n for n in RESULT_FILES if (out_dir / n).exists()]  # config first
    for name in old:
        os.replace(out_dir / name, replaced / name)
    new = sorted((p.name for p in work.iterdir()), key=lambda n: n == CONFIG_FILE)  # config last
    for name in new:
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name) if (out_dir / name).is_dir() else (out_dir / name).unlink()
        os.replace(work / name, out_dir / name)
    shutil.rmtree(replaced)
    shutil.rmtree(work)
