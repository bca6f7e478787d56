"""Train the toy UNet and CLIP text encoder jointly on VAE latents of rendered scenes.

    python scripts/toyworld/train_unet.py --hours 1.7

Needs the VAE from train_vae.py. Captions are drawn afresh from each scene's ground truth
(class word or synonym, with or without colour), dropped to "" with probability
``--cfg-drop`` so classifier-free guidance works. The loss is eps-prediction MSE with
min-SNR weighting; EMA weights of both models are kept and used for samples and export.
Resumable: re-running continues from <out>/unet_ckpt.safetensors (written atomically).

``--exclude-class star`` (repeatable, or a comma list) trains the retrain oracle: every
training scene whose ground truth holds that class (alone or as one of two objects) is
dropped, so neither the class word nor its synonyms ever appear in a caption; the other
scenes keep their seeds (scene i is still ``scene_from_seed(i)``). It needs an ``--out`` of
its own, and a resumed run refuses a checkpoint made with another exclusion. The VAE is
not retrained: ``--vae`` points at an existing one (``benchmarks/oracle.py`` passes the
shipped pipeline's ``vae/``).
"""

from __future__ import annotations

import argparse
import copy
import random
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
    COLOUR_NAMES,
    cached_tensor,
    has_checkpoint,
    jsonable,
    load_checkpoint,
    load_dataset,
    python_rng_json,
    python_rng_state,
    restore_training_state,
    save_checkpoint,
    save_grid,
    seed_all,
    training_state,
)

from receler.serialization import read_tensors  # noqa: E402
from receler.toyworld.model import (  # noqa: E402
    TextConfig,
    UNetConfig,
    assemble_pipeline,
    build_scheduler,
    build_text_encoder,
    build_unet,
)
from receler.toyworld.tokenizer import build_tokenizer  # noqa: E402
from receler.toyworld.vocab import CLASSES, STYLES, make_caption  # noqa: E402

SAMPLE_PROMPTS = [f"a photo of a {c}" for c in CLASSES] + [
    "a red star",
    "a blue heart",
    "a green ring",
    "a black arrow",
    "a pentagram",
    "a donut",
    "a striped circle",
    "a striped orange moon",
    "a striped square",
    "a yellow cross",
    "a circle and a star",
    "a red heart and a blue square",
    "a moon next to a triangle",
    "a diamond and a ring",
]


def parse_exclusion(values: list[str] | None) -> list[str]:
    """Sorted class names of ``--exclude-class`` values ("star", "star,heart"; repeatable).

    Raises:
        ValueError: a name that is not one of the ten classes.
    """
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        raise ValueError(
            f"unknown class {unknown[0]!r} to exclude: choose from {', '.join(CLASSES)}"
        )
    return sorted(set(names))


def kept_scenes(classes: np.ndarray, excluded: list[str]) -> np.ndarray:
    """Indices of the scenes whose ground truth holds none of ``excluded``.

    Args:
        classes: class indices (N, 2), -1 where a scene has no second object.
        excluded: class names (:func:`parse_exclusion`).

    Returns:
        Sorted indices into the N scenes (int64).
    """
    drop = np.isin(classes, [CLASSES.index(c) for c in excluded]).any(axis=1)  # (N,)
    return np.flatnonzero(~drop)


def exclusion_mismatch(meta: dict, excluded: list[str]) -> str | None:
    """Why a checkpoint's metadata does not fit this run's exclusion (``None`` if it does).
    Checkpoints from before the option have no key: they excluded nothing."""
    saved = sorted(meta.get("exclude_classes", []))
    if saved == excluded:
        return None

    def say(names: list[str]) -> str:
        return "--exclude-class " + ",".join(names) if names else "no --exclude-class"

    return f"it was trained with {say(saved)}, this run has {say(excluded)}"


def encode_latents(vae, images: np.ndarray, dev, batch: int = 512) -> torch.Tensor:
    """Scaled VAE latents (N, 4, 16, 16) float16 of uint8 images (N, 32, 32, 3)."""
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch), desc="encode"):
            x = (
                torch.from_numpy(images[i : i + batch]).to(dev).permute(0, 3, 1, 2).float() / 127.5
                - 1
            )
            out.append((vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).half().cpu())
    return torch.cat(out)


class CaptionSampler:
    """Draws a fresh caption for a scene from its ground truth and tokenizes it (cached)."""

    def __init__(self, tokenizer, data: dict[str, np.ndarray], seed: int, cfg_drop: float):
        self.tok, self.data, self.rng, self.cfg_drop = (
            tokenizer,
            data,
            random.Random(seed),
            cfg_drop,
        )
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(
                text, padding="max_length", max_length=self.tok.model_max_length, truncation=True
            ).input_ids
        return self.cache[text]

    def __call__(self, idx: list[int]) -> torch.Tensor:
        rows = []
        for i in idx:
            if self.rng.random() < self.cfg_drop:
                text = ""
            else:
                objs = [
                    (CLASSES[c], COLOUR_NAMES[k])
                    for c, k in zip(self.data["classes"][i], self.data["colours"][i], strict=True)
                    if c >= 0
                ]
                s = int(self.data["style"][i])
                text = make_caption(self.rng, objs, STYLES[s] if s >= 0 else None)
            rows.append(self.ids(text))
        return torch.tensor(rows)  # (B, model_max_length)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - decay)


@torch.no_grad()
def sample_grid(vae, unet, text, tok, path: Path, steps: int = 20, guidance: float = 5.0) -> None:
    pipe = assemble_pipeline(vae, unet, text, tok)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    imgs = []
    for _ in range(2):
        out = pipe(
            SAMPLE_PROMPTS,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=g,
            output_type="np",
        )
        imgs.append((out.images * 255).round().astype(np.uint8))
    save_grid(np.concatenate(imgs), path, nrow=12)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=CACHE, help="folder of checkpoints and outputs")
    ap.add_argument(
        "--vae", type=Path, default=None, help="VAE folder (default <out>/vae, from train_vae.py)"
    )
    ap.add_argument(
        "--exclude-class",
        action="append",
        default=None,
        metavar="NAME",
        help="drop every scene holding this class (repeatable or comma list; needs its own --out)",
    )
    ap.add_argument(
        "--hours", type=float, default=1.7, help="stop after this much wall time (this run)"
    )
    ap.add_argument("--steps", type=int, default=100000, help="stop after this many total steps")
    ap.add_argument("--batch", type=int, default=64, help="batch size")
    ap.add_argument("--lr", type=float, default=5e-4, help="AdamW peak learning rate")
    ap.add_argument("--warmup", type=int, default=300, help="linear warmup steps")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    ap.add_argument(
        "--anneal-at", type=int, default=0, help="step where the LR starts to decay (0 = never)"
    )
    ap.add_argument(
        "--anneal-steps", type=int, default=1000, help="steps of linear LR decay to 10%%"
    )
    ap.add_argument("--cfg-drop", type=float, default=0.1, help="caption dropout probability")
    ap.add_argument(
        "--snr-gamma", type=float, default=5.0, help="min-SNR weighting gamma (0 = off)"
    )
    ap.add_argument("--n-images", type=int, default=120000, help="training scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--ckpt-every", type=int, default=250, help="checkpoint interval, steps")
    ap.add_argument("--sample-every", type=int, default=500, help="sample grid interval, steps")
    args = ap.parse_args()
    try:
        excluded = parse_exclusion(args.exclude_class)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if excluded and args.out.resolve() == CACHE.resolve():
        sys.exit(
            f"error: --exclude-class needs an --out of its own, not the shipped model's {CACHE}"
        )
    ckpt_path = args.out / "unet_ckpt.safetensors"
    if has_checkpoint(ckpt_path):  # refused before anything is loaded or rendered
        why = exclusion_mismatch(read_tensors(ckpt_path, meta_only=True)[1], excluded)
        if why:
            sys.exit(f"error: {ckpt_path} does not fit: {why}; pass another --out")
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    dev = torch.device(args.device)

    from diffusers import AutoencoderKL

    vae = (
        AutoencoderKL.from_pretrained(args.vae or args.out / "vae")
        .to(dev)
        .eval()
        .requires_grad_(False)
    )
    tok = build_tokenizer(args.out / "tokenizer")
    data = load_dataset("train", args.n_images)
    latents = cached_tensor(
        args.out / f"latents_train_{args.n_images}.safetensors",
        lambda: encode_latents(vae, data["images"], dev),
    )
    if excluded:
        keep = kept_scenes(data["classes"], excluded)
        data = {k: v[keep] for k, v in data.items()}
        latents = latents[torch.from_numpy(keep)]
        print(f"excluded {', '.join(excluded)}: {len(keep)} of {args.n_images} scenes kept")
    print(f"latents {tuple(latents.shape)} std {latents[:4096].float().std():.3f}")

    unet = build_unet(UNetConfig()).to(
        dev, memory_format=torch.channels_last
    )  # faster convs on CPU
    text = build_text_encoder(tok, TextConfig()).to(dev)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / args.warmup)
        if args.anneal_at <= 0:
            return warm
        return warm * (1 - 0.9 * min(1.0, max(0.0, (s - args.anneal_at) / args.anneal_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    noise_sched = build_scheduler()
    alphas = noise_sched.alphas_cumprod.to(dev)  # (T,)
    captions = CaptionSampler(tok, data, args.seed, args.cfg_drop)
    models = {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text}
    step, trained_s = 0, 0.0
    if has_checkpoint(ckpt_path):
        tensors, meta = load_checkpoint(ckpt_path)
        restore_training_state(tensors, meta, models, opt, sched)
        captions.rng.setstate(python_rng_state(meta["caption_rng"]))
        step, trained_s = meta["step"], meta["trained_s"]
        sched.base_lrs = [args.lr] * len(sched.base_lrs)  # --lr applies to resumed runs too
        print(f"resumed at step {step} ({trained_s / 3600:.2f} h trained), peak lr {args.lr:g}")
    n_u = sum(p.numel() for p in unet.parameters())
    n_t = sum(p.numel() for p in text.parameters())
    print(f"UNet {n_u / 1e6:.2f}M params, text encoder {n_t / 1e6:.2f}M params")

    def save(step: int) -> None:
        tensors, meta = training_state(
            models,
            opt,
            sched,
            caption_rng=python_rng_json(captions.rng.getstate()),
            step=step,
            trained_s=trained_s,
            exclude_classes=excluded,
            args=jsonable(vars(args)),
        )
        save_checkpoint(ckpt_path, tensors, meta)

    t_start = time.time()
    t_last = t_start
    pbar = tqdm(total=args.steps, initial=step, desc="unet", mininterval=10)
    losses: list[float] = []
    while step < args.steps and time.time() - t_start < args.hours * 3600:
        idx = torch.randint(0, len(latents), (args.batch,))
        x0 = (
            latents[idx].to(dev).float().contiguous(memory_format=torch.channels_last)
        )  # (B, 4, 16, 16)
        ids = captions(idx.tolist()).to(dev)  # (B, L)
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(alphas), (args.batch,), device=dev)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text(ids)[0]  # (B, L, hidden)
        pred = unet(xt, t, cond).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if args.snr_gamma > 0:
            snr = alphas[t] / (1 - alphas[t])
            per = per * torch.clamp(snr, max=args.snr_gamma) / snr
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        now = time.time()
        trained_s += now - t_last
        t_last = now
        losses.append(loss.item())
        pbar.update(1)
        if step % 50 == 0:
            pbar.set_postfix(
                loss=f"{np.mean(losses[-50:]):.4f}", s_step=f"{trained_s / max(step, 1):.2f}"
            )
        if step % args.ckpt_every == 0:
            save(step)
        if step % args.sample_every == 0:
            sample_grid(vae, ema_unet, ema_text, tok, args.out / "samples" / f"unet_{step:06d}.png")
            t_last = time.time()  # sampling time is not training time
    save(step)
    print(f"stopped at step {step}, {trained_s / 3600:.2f} h trained")


if __name__ == "__main__":
    main()
