"""Export the EMA weights of the latest UNet checkpoint as the shipped toy pipeline.

    python scripts/toyworld/export.py [--steps 20 --guidance 7.5]

Assembles VAE + tokenizer (from train_vae.py / train_unet.py outputs) + EMA UNet and text
encoder into a StableDiffusionPipeline, saves it with save_pretrained (fp32 safetensors)
into src/receler/assets/toyworld/pipeline/ and records the sampler defaults.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, load_checkpoint, unprefixed  # noqa: E402

from receler.toyworld.model import (  # noqa: E402
    PIPELINE_DIR,
    SamplerDefaults,
    TextConfig,
    UNetConfig,
    assemble_pipeline,
    build_text_encoder,
    build_unet,
    save_pipeline,
)
from receler.toyworld.tokenizer import build_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, default=CACHE, help="training folder (vae/, unet_ckpt.safetensors)"
    )
    ap.add_argument(
        "--ckpt",
        type=Path,
        default=None,
        help="UNet checkpoint (default <out>/unet_ckpt.safetensors)",
    )
    ap.add_argument("--dest", type=Path, default=PIPELINE_DIR, help="pipeline folder to write")
    ap.add_argument(
        "--steps", type=int, default=SamplerDefaults.num_inference_steps, help="default DDIM steps"
    )
    ap.add_argument(
        "--guidance", type=float, default=SamplerDefaults.guidance_scale, help="default CFG scale"
    )
    ap.add_argument(
        "--no-ema", action="store_true", help="export the raw weights instead of the EMA"
    )
    args = ap.parse_args()

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.out / "vae")
    tok = build_tokenizer(args.out / "tokenizer")
    tensors, ck = load_checkpoint(args.ckpt or args.out / "unet_ckpt.safetensors")
    unet, text = build_unet(UNetConfig()), build_text_encoder(tok, TextConfig())
    unet.load_state_dict(unprefixed(tensors, "unet" if args.no_ema else "ema_unet"))
    text.load_state_dict(unprefixed(tensors, "text" if args.no_ema else "ema_text"))
    pipe = assemble_pipeline(vae, unet, text, tok)
    tmp = args.dest.with_name(args.dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(
        pipe, tmp, SamplerDefaults(num_inference_steps=args.steps, guidance_scale=args.guidance)
    )
    (tmp / "training_state.txt").write_text(
        f"step {ck['step']}\ntrained_s {ck['trained_s']:.0f}\nema {not args.no_ema}\n"
    )
    old = args.dest.with_name(args.dest.name + ".old")
    if args.dest.exists():
        os.replace(args.dest, old)
    os.replace(tmp, args.dest)
    shutil.rmtree(old, ignore_errors=True)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"exported step {ck['step']} to {args.dest} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
