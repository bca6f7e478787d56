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


def _add_candidate_flags(p: argparse.ArgumentParser) -> None:
    """``receler protocol``'s flags for a model erased elsewhere, and for what to leave out."""
    g = p.add_argument_group("a model erased elsewhere (measured instead of erasing here)")
    g.add_argument("--erasers", type=Path, default=None,
                   help="a folder written by `receler erase --method ...` (any method; it must "
                        "have erased --concept)")
    g.add_argument("--unet", default=None, metavar="PATH_OR_ID",
                   help="a fine-tuned UNet in diffusers format: its folder, a pipeline folder "
                        "(its unet/ is used) or a hub id; the base model keeps its own")
    g.add_argument("--text-encoder", default=None, metavar="PATH_OR_ID",
                   help="a fine-tuned CLIP text encoder, like --unet (combinable with it)")
    g.add_argument("--lora", type=Path, default=None, metavar="FILE",
                   help="a diffusers LoRA .safetensors file (UNet and/or text encoder; "
                        "needs peft: pip install 'receler[lora]')")
    g.add_argument("--name", default=None,
                   help="label in results.json and the leaderboard (default: the method, or "
                        "unet:FOLDER, lora:FILE, ...)")
    p.add_argument("--skip", action="append", default=None, metavar="STAGE[,STAGE]",
                   help="stages to leave out, their numbers null: latency, attack, two-object")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="denoising steps of every image (default: the model's; a quick look "
                        "only, runs with other steps are not comparable)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): repeatable to the bit on one "
                        "machine, slower on CUDA")


def _skip_stages(values: list[str] | None) -> tuple[str, ...]:
    """``--skip a,b --skip c`` as ``("a", "b", "c")``, checked."""
    from .protocol import skip_stages

    return skip_stages(",".join(values or ()))
