"""Image generation with or without erasers, seeded per image."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm.auto import tqdm

from .config import MODEL_DEFAULTS_FILE
from .erasers import erasers_disabled
from .pipeline import latent_shape
from .viz import image_grid


@dataclass
class SamplerSettings:
    """How images are sampled: the paper's protocol is DDIM 50 steps, guidance 7.5."""

    steps: int = 50  # DDIM steps
    guidance: float = 7.5  # classifier-free guidance scale
    height: int | None = None  # pixels; None = the UNet's sample size × the VAE factor
    width: int | None = None

    @classmethod
    def for_model(cls, model_path: str | Path | None) -> SamplerSettings:
        """The model's own defaults when its folder has ``receler_defaults.json`` (keys as in
        a pipeline call: ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``)."""
        path = Path(model_path) / MODEL_DEFAULTS_FILE if model_path else None
        if path is None or not path.is_file():
            return cls()
        d = json.loads(path.read_text())
        return cls(steps=d.get("num_inference_steps", cls.steps),
                   guidance=d.get("guidance_scale", cls.guidance),
                   height=d.get("height"), width=d.get("width"))


def image_size(pipe, settings: SamplerSettings) -> tuple[int, int]:
    _, h, w = latent_shape(pipe)
    f = pipe.vae_scale_factor
    return settings.height or h * f, settings.width or w * f


def seeded_latents(pipe, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """One initial latent per seed, each from its own CPU generator (device-independent)."""
    c, f = latent_shape(pipe)[0], pipe.vae_scale_factor
    return torch.stack([
        torch.randn((c, height // f, width // f), generator=torch.Generator("cpu").manual_seed(int(s)))
        for s in seeds]).to(pipe.unet.device, pipe.unet.dtype)


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
        latents = seeded_latents(pipe, seeds[i:i + batch_size], height, width)
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


def shard(items: Sequence, index: int, count: int) -> list:
    """Items of process ``index`` out of ``count``: every item in exactly one shard."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is outside 0..{count - 1}")
    return list(items[index::count])


def _save_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)  # a killed run never leaves a truncated image that a resume would skip


@torch.no_grad()
def generate_prompt_file(pipe, rows: Sequence, out_dir: Path, *, num_images: int = 1,
                         settings: SamplerSettings | None = None, batch_size: int = 8,
                         process_index: int = 0, num_processes: int = 1,
                         overwrite: bool = False, show_progress: bool = False) -> list[Path]:
    """Generate ``num_images`` per prompt row as ``{case_number}_{index}.png``, resumably.

    Image ``i`` of a row is the ``i``-th of ``num_images`` latents drawn from a generator
    seeded with the row's ``evaluation_seed`` (the reference protocol's batch), so it is the
    same whichever images already exist, whatever the batch size and however the rows are
    split across processes. Images already on disk are skipped (regenerated with
    ``overwrite``). A row's own guidance
    (I2P's ``evaluation_guidance``) and size override ``settings``.

    Returns:
        The paths written by this call.
    """
    settings = settings or SamplerSettings()
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c, f = latent_shape(pipe)[0], pipe.vae_scale_factor
    todo: dict[tuple, list[tuple]] = {}  # (guidance, height, width) -> [(row, index, path)]
    for row in shard(rows, process_index, num_processes):
        for i in range(num_images):
            path = out_dir / f"{row.case_number}_{i}.png"
            if path.exists() and not overwrite:
                continue
            guidance = row.guidance if row.guidance is not None else settings.guidance
            h, w = image_size(pipe, settings)
            h, w = row.height or h, row.width or w
            todo.setdefault((guidance, h, w), []).append((row, i, path))
    written = []
    bar = tqdm(total=sum(map(len, todo.values())), desc=f"generating [{process_index}]",
               disable=not show_progress, dynamic_ncols=True)
    for (guidance, h, w), items in todo.items():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            latents = torch.stack([
                torch.randn((num_images, c, h // f, w // f),
                            generator=torch.Generator("cpu").manual_seed(int(row.evaluation_seed)))[i]
                for row, i, _ in batch]).to(pipe.unet.device, pipe.unet.dtype)
            out = pipe([row.prompt for row, _, _ in batch], num_inference_steps=settings.steps,
                       guidance_scale=guidance, height=h, width=w, latents=latents,
                       output_type="pil")
            for img, (_, _, path) in zip(out.images, batch, strict=True):
                _save_atomic(img, path)
                written.append(path)
            bar.update(len(batch))
    bar.close()
    return written
