"""Image generation with or without erasers, seeded per image."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from PIL import Image

from .erasers import erasers_disabled
from .pipeline import latent_shape
from .viz import image_grid

DEFAULTS_FILE = "receler_defaults.json"


@dataclass
class SamplerSettings:
    """How images are sampled: the paper's protocol is DDIM 50 steps, guidance 7.5."""

    steps: int = 50  # DDIM steps
    guidance: float = 7.5  # classifier-free guidance scale
    height: int | None = None  # pixels; None = the UNet's sample size × the VAE factor
    width: int | None = None

    @classmethod
    def for_model(cls, model_path: str | Path | None) -> SamplerSettings:
        """The model's own defaults when its folder has ``receler_defaults.json``."""
        path = Path(model_path) / DEFAULTS_FILE if model_path else None
        if path is not None and path.is_file():
            d = json.loads(path.read_text())
            return cls(**{k: d[k] for k in ("steps", "guidance", "height", "width") if k in d})
        return cls()


def image_size(pipe, settings: SamplerSettings) -> tuple[int, int]:
    _, h, w = latent_shape(pipe)
    f = pipe.vae_scale_factor
    return settings.height or h * f, settings.width or w * f


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *,
             settings: SamplerSettings | None = None, batch_size: int = 8,
             progress=None) -> list[Image.Image]:
    """One image per (prompt, seed), in batches; each image has its own seeded generator,
    so an image does not depend on the batch it was drawn in.

    Args:
        pipe: a pipeline, with or without erasers attached.
        prompts: one prompt per image.
        seeds: one seed per image.
        settings: sampler settings (default: DDIM 50 steps, guidance 7.5).
        batch_size: images per pipeline call.
        progress: optional callable ``progress(n)`` told how many images were done.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    settings = settings or SamplerSettings()
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    height, width = image_size(pipe, settings)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[i:i + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        c = latent_shape(pipe)[0]
        latents = torch.stack([torch.randn((c, height // pipe.vae_scale_factor,
                                            width // pipe.vae_scale_factor), generator=g)
                               for g in gens]).to(pipe.unet.device, pipe.unet.dtype)
        out = pipe(batch_prompts, num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance, height=height, width=width,
                   latents=latents, output_type="pil")
        images.extend(out.images)
        if progress is not None:
            progress(len(batch_prompts))
    return images


def compare(pipe, prompts: Sequence[str], seeds: Sequence[int], *,
            settings: SamplerSettings | None = None, batch_size: int = 8, scale: int = 1
            ) -> tuple[list[Image.Image], list[Image.Image], Image.Image]:
    """Base (erasers off) and erased images with the same seeds, and a two-row grid."""
    with erasers_disabled(pipe.unet):
        base = generate(pipe, prompts, seeds, settings=settings, batch_size=batch_size)
    erased = generate(pipe, prompts, seeds, settings=settings, batch_size=batch_size)
    labels = [p if len(p) <= 24 else p[:22] + "…" for p in prompts]
    grid = image_grid(base + erased, cols=len(prompts), row_labels=["base", "erased"],
                      col_labels=labels, scale=scale)
    return base, erased, grid
