"""Image generation with or without erasers, seeded per image or per prompt row.

Two things decide which images a seed gives: the scheduler and where the initial noise
is drawn. receler's default is DDIM with every image's noise from its own CPU generator,
so an image does not depend on the device or the batch. The Receler reference instead
samples with K-LMS and, for I2P (following SLD), draws a row's whole batch of noise on
the GPU: ``jasper0314-huang/Receler``, ``test_receler.py``::

    scheduler = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                     beta_schedule="scaled_linear", num_train_timesteps=1000)
    generator = torch.Generator(device=device).manual_seed(seed)   # --use_cuda_generator
    pipeline(prompt=[row.prompt] * num_samples, height=512, width=512,
             num_inference_steps=50, guidance_scale=7.5, generator=generator)

with ``seed = row.evaluation_seed`` and images saved as ``{case_number}_{num}.png``. The
pipeline then draws ``torch.randn((num_samples, 4, 64, 64), generator=generator)`` in
float32 on the generator's device (diffusers' ``randn_tensor``). Without
``--use_cuda_generator`` it uses ``torch.manual_seed(seed)``, the CPU generator; ESD's
``eval-scripts/generate-images.py`` (``rohitgandikota/erasing``) does the same with
``torch.randn((batch_size, 4, 64, 64), generator=torch.manual_seed(seed))``. Both ignore
I2P's ``evaluation_guidance`` and size columns. :data:`PAPER` is that protocol:
``SamplerSettings(scheduler="lms", seeding="device", steps=50, guidance=7.5, height=512,
width=512, row_settings=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import MODEL_DEFAULTS_FILE
from .erasers import erasers_disabled
from .pipeline import latent_shape
from .viz import image_grid

SCHEDULERS = {"ddim": "DDIMScheduler", "lms": "LMSDiscreteScheduler"}  # diffusers' class names


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class of ``name`` (a key of :data:`SCHEDULERS`), imported here
    rather than with this module, which the benchmarks' table-building reads without
    diffusers."""
    import diffusers

    return getattr(diffusers, SCHEDULERS[name])
SEEDINGS = ("cpu", "device")


@dataclass
class SamplerSettings:
    """How images are sampled (default: DDIM 50 steps, guidance 7.5, CPU noise)."""

    steps: int = 50  # denoising steps
    guidance: float = 7.5  # classifier-free guidance scale
    height: int | None = None  # pixels; None = the UNet's sample size × the VAE factor
    width: int | None = None
    scheduler: str = field(default="ddim", metadata={"help": (
        "ddim, or lms: diffusers' LMSDiscreteScheduler from the pipeline's scheduler config "
        "(the Receler/ESD test scripts' sampler)")})
    seeding: str = field(default="cpu", metadata={"help": (
        "where a seed's initial noise is drawn: cpu (a CPU generator, the same on every "
        "device), or device (torch.Generator(pipeline device), the reference's "
        "--use_cuda_generator, bitwise the reference's noise on the same GPU)")})
    row_settings: bool = field(default=True, metadata={"help": (
        "prompt files: a row's evaluation_guidance and sd_image_* cells override guidance "
        "and size (the reference scripts ignore them)")})

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}: choose one of "
                             f"{', '.join(SCHEDULERS)}")
        if self.seeding not in SEEDINGS:
            raise ValueError(f"unknown seeding {self.seeding!r}: choose one of "
                             f"{', '.join(SEEDINGS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps!r} (a whole number)")
        if (isinstance(self.guidance, bool) or not isinstance(self.guidance, int | float)
                or not math.isfinite(self.guidance) or self.guidance < 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r} "
                             "(7.5 is the paper's)")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive number of pixels, got {value}")

    @classmethod
    def for_model(cls, model_path: str | Path | None) -> SamplerSettings:
        """The model's own defaults when its folder has ``receler_defaults.json`` (keys as in
        a pipeline call: ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``)."""
        path = Path(model_path) / MODEL_DEFAULTS_FILE if model_path else None
        if path is None or not path.is_file():
            return cls()
        from .config import read_json_object

        d = read_json_object(path)
        try:
            return cls(steps=d.get("num_inference_steps", cls.steps),
                       guidance=d.get("guidance_scale", cls.guidance),
                       height=d.get("height"), width=d.get("width"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}; fix or delete the file") from None


# The paper's evaluation sampler, as the Receler reference's test_receler.py runs it.
PAPER = SamplerSettings(steps=50, guidance=7.5, height=512, width=512, scheduler="lms",
                        seeding="device", row_settings=False)
SAMPLER_PRESETS = {"paper": PAPER}


def sampler_preset(name: str, **overrides) -> SamplerSettings:
    """A copy of the preset ``name`` (``"paper"``) with ``overrides`` (``None`` = keep)."""
    if name not in SAMPLER_PRESETS:
        raise ValueError(f"unknown sampler preset {name!r}: choose one of "
                         f"{', '.join(SAMPLER_PRESETS)}")
    return replace(SAMPLER_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def use_scheduler(pipe, name: str) -> None:
    """Give ``pipe`` the scheduler ``name`` (``ddim`` or ``lms``), built from its scheduler's
    config (noise schedule, prediction type); a scheduler of that class is kept as it is.
    For SD 1.4's config, ``lms`` has the reference's timesteps and sigmas."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    cls = scheduler_class(name)
    if type(pipe.scheduler) is not cls:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


def image_size(pipe, settings: SamplerSettings) -> tuple[int, int]:
    _, h, w = latent_shape(pipe)
    f = pipe.vae_scale_factor
    return settings.height or h * f, settings.width or w * f


def seed_noise(pipe, seed: int, n: int, height: int, width: int, *,
               seeding: str = "cpu") -> torch.Tensor:
    """``torch.randn((n, C, height/f, width/f))`` in float32 from one generator seeded with
    ``seed``: a CPU generator, or with ``seeding="device"`` one on the UNet's device
    (``torch.Generator(device).manual_seed(seed)``, as the reference draws a row's batch)."""
    if seeding not in SEEDINGS:
        raise ValueError(f"unknown seeding {seeding!r}: choose one of {', '.join(SEEDINGS)}")
    c, f = latent_shape(pipe)[0], pipe.vae_scale_factor
    device = pipe.unet.device if seeding == "device" else torch.device("cpu")
    generator = torch.Generator(device).manual_seed(int(seed))
    return torch.randn((n, c, height // f, width // f), generator=generator, device=device,
                       dtype=torch.float32)


def seeded_latents(pipe, seeds: Sequence[int], height: int, width: int, *,
                   seeding: str = "cpu") -> torch.Tensor:
    """One initial latent per seed, each from its own generator (see :func:`seed_noise`)."""
    return torch.cat([seed_noise(pipe, s, 1, height, width, seeding=seeding) for s in seeds]
                     ).to(pipe.unet.device, pipe.unet.dtype)


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
        settings: sampler settings (default: DDIM 50 steps, guidance 7.5). Its scheduler
            replaces ``pipe.scheduler``; with ``seeding="device"`` a seed's noise is the
            reference's for a batch of one.
        batch_size: images per pipeline call.
        progress: optional callable ``progress(n)`` told how many images were done.
    """
    check_batch_size(batch_size)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    settings = settings or SamplerSettings()
    use_scheduler(pipe, settings.scheduler)
    height, width = image_size(pipe, settings)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[i:i + batch_size])
        latents = seeded_latents(pipe, seeds[i:i + batch_size], height, width,
                                 seeding=settings.seeding)
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


# Processes that wait at a barrier while the main one trains or attacks (hours at SD scale)
# must not time out. A process that fails still ends the run at once: `accelerate launch`
# (torchrun) stops the others.
BARRIER_TIMEOUT = timedelta(hours=48)


def process_state(device: str | None = None):
    """accelerate's ``PartialState``: this process's ``process_index`` among the
    ``num_processes`` that ``accelerate launch`` (or torchrun) started, its ``device`` and
    ``wait_for_everyone()``; one process when nothing launched it. ``device="cpu"`` gives
    CPU processes (the gloo backend)."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu", timeout=BARRIER_TIMEOUT)


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

    Image ``i`` of a row starts from the ``i``-th of ``num_images`` latents drawn at once,
    ``torch.randn((num_images, C, H/f, W/f))``, from one generator seeded with the row's
    ``evaluation_seed`` (the reference scripts' batch; on the CPU or, with
    ``settings.seeding="device"``, on the UNet's device). So it is the same whichever images
    already exist, whatever the batch size and however the rows are split across
    processes. The batches are planned over every row and dealt out whole, every
    ``num_processes``-th to process ``process_index``, so an image is drawn in the same
    batch however many processes share the work: on the same hardware a split run's
    images are bitwise one process's (a batch's arithmetic may change an image's last bit).
    Images already on disk are skipped (regenerated with ``overwrite``). With
    ``settings.row_settings`` a row's own guidance (I2P's ``evaluation_guidance``) and size
    override ``settings``.

    Returns:
        The paths written by this call.
    """
    settings = settings or SamplerSettings()
    check_batch_size(batch_size)
    if settings.row_settings:  # the rows' own guidance and sizes, checked before any image
        for row in rows:
            try:
                replace(settings, height=row.height, width=row.width,
                        guidance=settings.guidance if row.guidance is None else row.guidance)
            except ValueError as e:
                raise ValueError(f"prompt row with case_number {row.case_number}: {e}; fix "
                                 "the row, or pass --no-row-settings") from None
    use_scheduler(pipe, settings.scheduler)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan: dict[tuple, list[tuple]] = {}  # (guidance, height, width) -> [(row, index, path)]
    for row in rows:  # every row: the same plan on every process, whatever is on disk
        guidance, (h, w) = settings.guidance, image_size(pipe, settings)
        if settings.row_settings:
            guidance = row.guidance if row.guidance is not None else guidance
            h, w = row.height or h, row.width or w
        plan.setdefault((guidance, h, w), []).extend(
            (row, i, out_dir / f"{row.case_number}_{i}.png") for i in range(num_images))
    batches = [(size, items[start:start + batch_size])
               for size, items in plan.items() for start in range(0, len(items), batch_size)]
    todo = [(size, batch) for size, items in shard(batches, process_index, num_processes)
            if (batch := [it for it in items if overwrite or not it[2].exists()])]
    written = []
    bar = tqdm(total=sum(len(batch) for _, batch in todo), desc=f"generating [{process_index}]",
               disable=not show_progress, dynamic_ncols=True)
    for (guidance, h, w), batch in todo:
        latents = torch.stack([
            seed_noise(pipe, row.evaluation_seed, num_images, h, w,
                       seeding=settings.seeding)[i]
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


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a whole number of at least 1, got {batch_size!r}: "
                         "pass --batch-size 1 or more")
