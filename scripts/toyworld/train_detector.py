"""Train the toy detector (multi-label classes + style) and ship it into the package.

    python scripts/toyworld/train_detector.py --steps 1500

Trains on rendered scenes with augmentation (blur, noise, colour jitter, shifts) and, when
the VAE from train_vae.py exists, on VAE reconstructions so it tolerates the VAE's blur.
Reports exact-match accuracy (all classes and the style right) on freshly rendered test
scenes, plain and VAE-reconstructed, and writes src/receler/assets/toyworld/detector/.
"""

from __future__ import annotations

import argparse
import json
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
    cached_tensor,
    has_checkpoint,
    load_checkpoint,
    load_dataset,
    restore_training_state,
    save_checkpoint,
    seed_all,
    training_state,
)

from receler.toyworld.detector import DETECTOR_DIR, DetectorConfig, ToyDetector, save_detector  # noqa: E402
from receler.toyworld.vocab import CLASSES, STYLES  # noqa: E402


def targets(data: dict[str, np.ndarray]) -> torch.Tensor:
    """Multi-hot targets (N, n_classes + n_styles)."""
    n = len(data["classes"])
    y = np.zeros((n, len(CLASSES) + len(STYLES)), np.float32)
    for j in range(2):
        c = data["classes"][:, j]
        y[np.arange(n)[c >= 0], c[c >= 0]] = 1
    s = data["style"]
    y[np.arange(n)[s >= 0], len(CLASSES) + s[s >= 0]] = 1
    return torch.from_numpy(y)


def reconstruct(vae, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """VAE reconstructions (N, 3, H, W) in [0, 1] of images in [0, 1]."""
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch), desc="vae recon"):
            x = images[i : i + batch] * 2 - 1
            out.append(((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random blur, shift, colour jitter and noise on a batch (N, 3, H, W) in [0, 1]."""
    n = len(x)
    blur = torch.rand(n) < 0.4
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x = x.clone()
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    dx, dy = np.random.randint(-2, 3, size=2)
    x = torch.roll(
        F.pad(x, (2, 2, 2, 2), mode="replicate"), shifts=(int(dy), int(dx)), dims=(2, 3)
    )[:, :, 2:-2, 2:-2]
    gain = 1 + 0.15 * (torch.rand(n, 1, 1, 1) - 0.5)
    bias = 0.1 * (torch.rand(n, 3, 1, 1) - 0.5)
    x = x * gain + bias + 0.03 * torch.rand(n, 1, 1, 1) * torch.randn_like(x)
    return x.clamp(0, 1)


@torch.no_grad()
def accuracy(det: ToyDetector, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Exact-match accuracy (classes and style), class-set and style accuracy."""
    det.eval()
    out = det.predict(x)
    det.train()
    p = torch.cat([out["class_probs"], out["style_probs"]], 1) > 0.5
    ok = p == y.bool()
    nc = len(CLASSES)
    return {
        "exact": ok.all(1).float().mean().item(),
        "classes": ok[:, :nc].all(1).float().mean().item(),
        "style": ok[:, nc:].all(1).float().mean().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=CACHE, help="folder of checkpoints and outputs")
    ap.add_argument(
        "--export", type=Path, default=DETECTOR_DIR, help="where to write the trained detector"
    )
    ap.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    ap.add_argument("--batch", type=int, default=128, help="batch size")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    ap.add_argument(
        "--n-images", type=int, default=120000, help="training scenes (shared with the VAE/UNet)"
    )
    ap.add_argument(
        "--n-recon", type=int, default=8000, help="training scenes also seen through the VAE"
    )
    ap.add_argument("--n-test", type=int, default=2000, help="fresh test scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    dev = torch.device(args.device)

    data = load_dataset("train", args.n_images)
    x_all = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
    y_all = targets(data)
    test = load_dataset("test", args.n_test)
    x_test = torch.from_numpy(test["images"]).permute(0, 3, 1, 2).float() / 255
    y_test = targets(test)
    vae = None
    if (args.out / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.out / "vae").eval()
        x_rec = cached_tensor(
            args.out / f"detector_recon_{args.n_recon}.safetensors",
            lambda: (
                (reconstruct(vae, x_all[: args.n_recon].float() / 255) * 255)
                .round()
                .to(torch.uint8)
            ),
        )
        x_test_rec = reconstruct(vae, x_test)

    det = ToyDetector(DetectorConfig()).to(dev)
    print(f"detector params: {sum(p.numel() for p in det.parameters()) / 1e6:.3f}M")
    opt = torch.optim.AdamW(det.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1
    )
    ckpt_path = args.out / "detector_ckpt.safetensors"
    step = 0
    if has_checkpoint(ckpt_path):
        tensors, meta = load_checkpoint(ckpt_path)
        restore_training_state(tensors, meta, {"model": det}, opt, sched)
        step = meta["step"]
    t0 = time.time()
    pbar = tqdm(
        range(step, args.steps), initial=step, total=args.steps, desc="detector", mininterval=5
    )
    for step in pbar:
        idx = torch.randint(0, len(x_all), (args.batch,))
        x = x_all[idx].float() / 255
        if vae is not None:  # a quarter of each batch is seen through the VAE
            k = args.batch // 4
            ridx = torch.randint(0, len(x_rec), (k,))
            x = torch.cat([x[k:], x_rec[ridx].float() / 255])
            y = torch.cat([y_all[idx[k:]], y_all[ridx]])
        else:
            y = y_all[idx]
        loss = F.binary_cross_entropy_with_logits(det(augment(x).to(dev)), y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pbar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_path, *training_state({"model": det}, opt, sched, step=step + 1))
    train_s = time.time() - t0
    det = det.cpu().eval()
    report = {
        "fresh_renders": accuracy(det, x_test, y_test),
        "train_s": round(train_s),
        "n_test": args.n_test,
    }
    if vae is not None:
        report["vae_reconstructions"] = accuracy(det, x_test_rec, y_test)
    print(json.dumps(report, indent=2))
    save_detector(det, args.export)
    (args.export / "metrics.json").write_text(
        json.dumps(report, indent=2, sort_keys=True), encoding="utf-8"
    )
    print(f"saved {args.export}")


if __name__ == "__main__":
    main()
