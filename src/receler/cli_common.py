"""What every ``receler`` command shares: the model flags, loading, and refusing to
overwrite."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local diffusers folder (default: the shipped toy model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if any)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="precision of the loaded model (default: bf16 on CUDA, fp32 on the CPU); "
                        "trained weights keep fp32 master copies whatever this is")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, or OMP_NUM_THREADS)")


def _load(args, model: str, device=None):
    """The pipeline of ``--model``/``--device``/``--dtype`` (without its safety checker)."""
    from .pipeline import load_pipeline

    return load_pipeline(model, device=device or args.device, dtype=args.dtype)


def _say_safety_checker_off() -> None:
    """Said by the commands that generate, once their inputs have loaded: the safety checker
    would black out the very images an erasure evaluation counts."""
    from .pipeline import SAFETY_CHECKER_NOTE

    print(f"note: {SAFETY_CHECKER_NOTE}", file=sys.stderr)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass --overwrite or choose another --out")
