"""Loading pipelines and the small pieces of sampling that training needs.

Every size comes from the model's own config: latent channels and size from the
UNet, the prompt length from the tokenizer, the timestep count from the scheduler.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import hf_hub_download

if TYPE_CHECKING:  # diffusers is imported where it is used: the CLI checks its flags without it
    from diffusers import DDIMScheduler, DiffusionPipeline

from .config import default_model  # noqa: F401  (kept here: callers import it from pipeline)

logger = logging.getLogger(__name__)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | None = None) -> torch.device:
    """``device`` as a ``torch.device``, checked; default CUDA if available, else the CPU."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"invalid device {device!r}: pass cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device "
                         f"(torch {torch.__version__}); pass --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) "
                         "are visible")
    return dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp32"``/``"bf16"``/``"fp16"`` (or a ``torch.dtype``, or ``None``) as a dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: pass one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 (or fp16) on CUDA, fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_index(model: str) -> dict:
    """``model_index.json`` of a local folder or a hub id (one small download for a hub id)."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{model} is not a diffusers pipeline (no model_index.json): pass "
                             "a folder written by save_pretrained, or a hub id")
    elif path.exists():
        raise ValueError(f"{model} is a file, not a diffusers pipeline folder: pass a folder "
                         "written by save_pretrained, or a hub id")
    else:
        try:
            index = Path(hf_hub_download(model, "model_index.json"))
        except Exception as e:  # noqa: BLE001 - the hub client raises many kinds
            raise ValueError(f"cannot load pipeline {model!r}: {str(e).splitlines()[0]} (pass a "
                             "local diffusers folder, or a hub id reachable from here)") from None
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {index}: {e}; the pipeline folder is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{index} is not a diffusers model_index.json (not a JSON object)")
    return data


def load_pipeline(model: str | None = None, *, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None) -> DiffusionPipeline:
    """Load a Stable-Diffusion-family pipeline by hub id or local folder (safetensors only).

    The safety checker is never loaded, by hub id or by folder: it replaces every image it
    flags with a black one, which would make nudity counts on I2P near zero for every
    model, the unerased one included. ``SAFETY_CHECKER_NOTE`` is what the CLI tells users.

    Args:
        model: hub id or folder written by ``save_pretrained``; ``None`` is the toy model.
        device: where to put it; default CUDA if available.
        dtype: ``torch.float32``/``bfloat16``/``float16`` or ``"fp32"``/``"bf16"``/``"fp16"``;
            default bf16/fp16 on CUDA, fp32 on the CPU. Trained weights keep fp32 master
            copies whatever this is (see the training methods).
    """
    model = model or default_model()
    device = pick_device(device) if not isinstance(device, torch.device) else device
    dtype = parse_dtype(dtype) or default_dtype(device)
    kwargs = {}
    if "safety_checker" in model_index(model):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True,
                                                 **kwargs)
    except OSError as e:
        raise ValueError(f"cannot load pipeline {model!r}: {str(e).splitlines()[0]}") from None
    if getattr(pipe, "safety_checker", None) is not None:  # a custom pipeline class
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)  # ours show progress over whole jobs
    pipe.to(device)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


SAFETY_CHECKER_NOTE = ("safety checker off: receler loads every pipeline without it, so "
                       "flagged images are kept as generated (the evaluation needs them)")


@dataclass
class Conditioning:
    """What a UNet call needs besides ``z_t`` and ``t``."""

    hidden: torch.Tensor  # (B, T, D) prompt embedding
    added: dict[str, torch.Tensor] | None = None  # SDXL-style extra conditions

    def with_hidden(self, hidden: torch.Tensor) -> Conditioning:
        return Conditioning(hidden, self.added)

    def select(self, rows: torch.Tensor) -> Conditioning:
        """The batch rows ``rows`` (a boolean mask or indices)."""
        added = None if self.added is None else {k: v[rows] for k, v in self.added.items()}
        return Conditioning(self.hidden[rows], added)

    def cat(self, other: Conditioning) -> Conditioning:
        added = None
        if self.added is not None:
            added = {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()}
        return Conditioning(torch.cat([self.hidden, other.hidden]), added)


def latent_shape(pipe) -> tuple[int, int, int]:
    """``(C, H, W)`` of the UNet's latent, from its config."""
    cfg = pipe.unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return cfg.in_channels, h, w


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> Conditioning:
    """Encode prompts the way the pipeline does (padding to the tokenizer's max length)."""
    device = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL-style: two encoders + pooled
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=device,
                                                  num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        _, h, w = latent_shape(pipe)
        size = (h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
        time_ids = torch.tensor([[*size, 0, 0, *size]], device=device, dtype=hidden.dtype)
        return Conditioning(hidden, {"text_embeds": pooled,
                                     "time_ids": time_ids.expand(len(prompts), -1)})
    hidden, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    return Conditioning(hidden)


def concept_token_indices(tokenizer, concept: str) -> list[int]:
    """Positions of the concept's tokens in the encoded prompt ``concept`` (after BOS)."""
    ids = tokenizer(concept, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"concept {concept!r} has no tokens: pass a non-empty concept")
    return list(range(1, 1 + len(ids)))


def unet_eps(unet, z: torch.Tensor, t: torch.Tensor | int, cond: Conditioning) -> torch.Tensor:
    """One UNet call, with SDXL's extra conditions when there are any."""
    kwargs = {"added_cond_kwargs": cond.added} if cond.added is not None else {}
    return unet(z, t, encoder_hidden_states=cond.hidden, **kwargs).sample


def ddim_scheduler(pipe, steps: int) -> DDIMScheduler:
    """A DDIM scheduler with the pipeline's noise schedule, set to ``steps`` steps."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, device=pipe.unet.device)
    return sched


@torch.no_grad()
def ddim_until(pipe, sched: DDIMScheduler, latents: torch.Tensor, uncond: Conditioning,
               cond: Conditioning, guidance: float, steps_done: int, count=None,
               keep: bool = False) -> torch.Tensor:
    """Run ``steps_done`` DDIM steps with classifier-free guidance from ``latents`` (1, C, H, W).

    Returns:
        ``z_t`` at ``t = sched.timesteps[steps_done]``; with ``keep``, the whole trajectory
        ``(steps_done + 1, C, H, W)``, row ``i`` being the latent at ``sched.timesteps[i]``.
    """
    both = uncond.cat(cond)
    path = [latents]
    for t in sched.timesteps[:steps_done]:
        inp = sched.scale_model_input(torch.cat([latents] * 2), t)
        e_u, e_c = unet_eps(pipe.unet, inp, t, both).chunk(2)
        if count is not None:
            count(2)
        latents = sched.step(e_u + guidance * (e_c - e_u), t, latents).prev_sample
        path.append(latents)
    return torch.cat(path) if keep else latents
