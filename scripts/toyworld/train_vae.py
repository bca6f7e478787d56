"""Train the toy VAE (AutoencoderKL, 3x32x32 <-> 4x16x16) on rendered scenes.

    python scripts/toyworld/train_vae.py --steps 1200

Resumable: re-running continues from <out>/vae_ckpt.safetensors. Writes <out>/vae/
(save_pretrained, with the latent ``scaling_factor`` set to 1/std of the latents) and
reconstruction grids.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    CACHE,
    has_checkpoint,
    load_checkpoint,
    load_dataset,
    restore_training_state,
    save_checkpoint,
    save_grid,
    seed_all,
    to_uint8,
    training_state,
)

from receler.toyworld.model import VAEConfig, build_vae  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=CACHE, help="folder of checkpoints and outputs")
    ap.add_argument("--steps", type=int, default=1200, help="total optimiser steps")
    ap.add_argument("--batch", type=int, default=64, help="batch size")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    ap.add_argument("--kl", type=float, default=1e-6, help="KL weight")
    ap.add_argument("--n-images", type=int, default=120000, help="training scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--every", type=int, default=200, help="checkpoint / grid interval")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    dev = torch.device(args.device)

    data = load_dataset("train", args.n_images)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
    val = torch.from_numpy(load_dataset("val", 2000)["images"][:32]).permute(0, 3, 1, 2)
    vae = build_vae(VAEConfig()).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05
    )
    ckpt_path = args.out / "vae_ckpt.safetensors"
    step = 0
    if has_checkpoint(ckpt_path):
        tensors, meta = load_checkpoint(ckpt_path)
        restore_training_state(tensors, meta, {"model": vae}, opt, sched)
        step = meta["step"]
        print(f"resumed at step {step}")
    print(f"VAE params: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M")

    def to_float(x: torch.Tensor) -> torch.Tensor:
        return x.to(dev).float() / 127.5 - 1.0

    t0 = time.time()
    pbar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="vae")
    for step in pbar:
        idx = torch.randint(0, len(images), (args.batch,))
        x = to_float(images[idx])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = post.kl().mean()
        loss = rec_loss + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        pbar.set_postfix(
            rec=f"{rec_loss.item():.4f}",
            kl=f"{kl.item():.0f}",
            s_step=f"{(time.time() - t0) / (step + 1 - pbar.initial if step + 1 > pbar.initial else 1):.2f}",
        )
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            vae.eval()
            with torch.no_grad():
                xv = to_float(val)
                rv = vae.decode(vae.encode(xv).latent_dist.mode()).sample
            vae.train()
            save_grid(
                np.concatenate([to_uint8(xv), to_uint8(rv)]),
                args.out / "samples" / f"vae_{step + 1:05d}.png",
            )
            save_checkpoint(ckpt_path, *training_state({"model": vae}, opt, sched, step=step + 1))

    # Latent scale: SD multiplies latents by 1/std so they have unit variance.
    vae.eval()
    with torch.no_grad():
        lat = torch.cat(
            [
                vae.encode(to_float(images[i : i + 256])).latent_dist.mode()
                for i in range(0, min(4096, len(images)), 256)
            ]
        )
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(args.out / "vae")
    print(
        f"latent mean {lat.mean():.3f} std {lat.std():.3f} -> scaling_factor {scale:.4f}; saved {args.out / 'vae'}"
    )
    print(f"training time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
