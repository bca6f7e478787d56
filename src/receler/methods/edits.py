"""Files and bookkeeping shared by the erasure methods.

A method's result is a folder: ``eraser_config.json`` (an :class:`EditConfig`, i.e. the
usual :class:`~receler.config.EraserConfig` with ``method`` set, plus the method's own
``options`` and the compute it spent in ``stats``) and, for methods that change UNet
weights (ESD, UCE), ``unet_edit.safetensors`` holding *only* the changed parameters
under their UNet names. Loading checks every name and shape before any weight is
touched; nothing is unpickled.

A UNet that received an edit remembers it in one attribute (``_receler_edit``): the
method name and, unless the caller declined, the original values of the replaced
parameters, so :func:`restore_unet_edit` can undo it and :func:`unet_edit_disabled`
can swap the original weights in for a block (pointer swaps, no copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import EraserConfig
from ..serialization import read_tensors, save_tensors

EDIT_FILE = "unet_edit.safetensors"
EDIT_FORMAT = "receler-unet-edit"
_EDIT_ATTR = "_receler_edit"


@dataclass
class EditConfig(EraserConfig):
    """``eraser_config.json`` of any method: :class:`EraserConfig` plus two fields.

    ``rank`` and ``layers`` only mean something for eraser methods (0 and empty otherwise).
    """

    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "method-specific settings (UCE anchor and preserved concepts, SLD guidance)"})
    stats: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "compute spent: trainable_parameters, unet_forward, unet_backward, seconds"})


def save_unet_edit(unet: nn.Module, names: list[str], out_dir: Path, *, method: str,
                   values: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write the parameters ``names`` of ``unet``: their current values, or
    ``values`` (e.g. a trainer's fp32 master weights) where given."""
    params = dict(unet.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the UNet has no parameter {missing[0]}")
    values = values or {}
    path = Path(out_dir) / EDIT_FILE
    save_tensors(path, {n: values.get(n, params[n]) for n in names},
                 {"format": EDIT_FORMAT, "method": method})
    return path


def read_unet_edit(unet: nn.Module, path: Path, *, method: str) -> dict[str, torch.Tensor]:
    """Read ``unet_edit.safetensors`` and check it against ``unet`` without changing it.

    Raises:
        ValueError: another format or method, a parameter the UNet lacks, or a shape that
            differs; the message names the parameter and both shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {EDIT_FILE} in {path.parent}: pass the --out folder of a "
                                f"finished {method} run")
    tensors, meta = read_tensors(path)
    if meta.get("format") != EDIT_FORMAT:
        raise ValueError(f"{path} is not a receler UNet edit (format {meta.get('format')!r})")
    if meta.get("method") != method:
        raise ValueError(f"{path} was written by method {meta.get('method')!r}, but its "
                         f"eraser_config.json says {method!r}: the folder is inconsistent")
    params = dict(unet.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise ValueError(f"edit file {path} changes parameter {name}, which this UNet does "
                             "not have: it was made for another UNet")
        if value.shape != params[name].shape:
            raise ValueError(f"edit file {path} has shape {tuple(value.shape)} for {name}, this "
                             f"UNet expects {tuple(params[name].shape)}: it was made for another "
                             "UNet")
    return tensors


def current_edit(unet: nn.Module) -> dict[str, Any] | None:
    """``{"method": ..., "original": {name: tensor} | None}`` of the weight edit on ``unet``."""
    return getattr(unet, _EDIT_ATTR, None)


def mark_unet_edit(unet: nn.Module, method: str, original: dict[str, torch.Tensor] | None) -> None:
    """Record that ``unet`` holds ``method``'s weights; ``original`` lets it be undone."""
    setattr(unet, _EDIT_ATTR, {"method": method, "original": original})


@torch.no_grad()
def apply_unet_edit(unet: nn.Module, tensors: dict[str, torch.Tensor], *, method: str,
                    keep_original: bool = True) -> None:
    """Copy checked ``tensors`` into the UNet's parameters (cast to their dtype and device)."""
    if current_edit(unet) is not None:
        raise ValueError(f"this UNet already holds a {current_edit(unet)['method']} edit: call "
                         "remove_edit(pipe) first, or load a fresh pipeline")
    params = dict(unet.named_parameters())
    original = {n: params[n].detach().clone() for n in tensors} if keep_original else None
    for name, value in tensors.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))
    mark_unet_edit(unet, method, original)


@torch.no_grad()
def restore_unet_edit(unet: nn.Module) -> str | None:
    """Put the original weights back; returns the removed method, ``None`` if there was none.

    Raises:
        ValueError: the edit was loaded with ``keep_original=False``.
    """
    edit = current_edit(unet)
    if edit is None:
        return None
    if edit["original"] is None:
        raise ValueError(f"the {edit['method']} edit was loaded with keep_original=False, so the "
                         "original weights are gone: load a fresh pipeline instead")
    params = dict(unet.named_parameters())
    for name, value in edit["original"].items():
        params[name].copy_(value)
    delattr(unet, _EDIT_ATTR)
    return edit["method"]


@contextmanager
def unet_edit_disabled(unet: nn.Module) -> Iterator[None]:
    """Run the original weights inside the block (swaps storage pointers, copies nothing)."""
    edit = current_edit(unet)
    if edit is None:
        yield
        return
    if edit["original"] is None:
        raise ValueError(f"the {edit['method']} edit was loaded with keep_original=False: the "
                         "original weights are not available")
    params = dict(unet.named_parameters())

    def swap():
        for name, value in edit["original"].items():
            p = params[name]
            edit["original"][name], p.data = p.data, value

    swap()
    try:
        yield
    finally:
        swap()
