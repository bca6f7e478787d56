"""MACE's second stage: one LoRA per concept on the refined cross-attention, trained so
that the concept's tokens get no attention inside the concept's region.

Per concept (as ``src/cfr_lora_training.py`` of Shilin-LU/MACE, ``train_seperate``):

1. the base model draws ``images`` images of ``image_prompt`` by DDIM with guidance; the
   concept's region of each is the base model's own map while it draws it (see
   :func:`concept_images`), where the code segments the images with Grounded-SAM;
2. a fresh rank-``rank`` LoRA wraps every ``attn2.to_k``/``to_v`` (peft-style: the wrapper
   keeps ``base_layer``, runs the *refined* weight instead of the module's own and adds
   ``up(down(x))``; ``up`` starts at zero, ``down`` ~ N(0, 1/rank²) as diffusers'
   ``LoRALinearLayer``), and the UNet's parameters are never written;
3. ``steps`` AdamW steps (betas 0.9/0.999, weight decay 0.01, gradient norm clipped to
   1), each on one image noised to a ``t`` drawn from the code's importance window and
   one of the concept's template prompts, minimise :func:`attention_loss`.

The LoRA comes back as ``ΔW = up · down`` per weight, and the wrappers are removed in
``finally``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import (
    binary_mask,
    capture_cross_attention,
    concept_attention,
    guidance_map,
    layer_hw,
)
from ..erasers import find_cross_attention
from ..pipeline import Conditioning, ddim_scheduler, encode, latent_shape, unet_eps
from .mace import MaceOptions

WEIGHT_DECAY, MAX_GRAD_NORM, BETAS, EPS = 0.01, 1.0, (0.9, 0.999), 1e-8  # the code's AdamW
_PROJECTIONS = ("to_k", "to_v")


class LoraLinear(nn.Module):
    """``x ↦ W x + b + up(down(x))``: a fixed weight ``W`` (the refined one) in place of
    ``base_layer``'s, its bias, and a trainable low-rank term computed in fp32."""

    def __init__(self, base_layer: nn.Linear, weight: torch.Tensor, rank: int,
                 generator: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.register_buffer("weight", weight.to(device, base_layer.weight.dtype),
                             persistent=False)
        self.down = nn.Linear(base_layer.in_features, rank, bias=False, device=device)
        self.up = nn.Linear(rank, base_layer.out_features, bias=False, device=device)
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(self.down.weight.shape, generator=generator)
                                   / rank)
            self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.base_layer.bias)
        return out + self.up(self.down(x.float())).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """``(out, in)``: the LoRA's weight change, float64."""
        return (self.up.weight @ self.down.weight).detach().double()


@contextmanager
def lora_attached(unet: nn.Module, weights: dict[str, torch.Tensor], rank: int,
                  generator: torch.Generator) -> Iterator[dict[str, LoraLinear]]:
    """Wrap every ``attn2.to_k``/``to_v`` in a :class:`LoraLinear` running ``weights[name]``
    (keyed ``{attn2}.to_k.weight``) inside the block; all are checked before any is set.

    Yields:
        ``{parameter name: wrapper}``.
    """
    targets = {}
    for name, attn in find_cross_attention(unet).items():
        for proj in _PROJECTIONS:
            layer, key = getattr(attn, proj), f"{name}.{proj}.weight"
            if not isinstance(layer, nn.Linear) or key not in weights:
                raise ValueError(f"{name}.{proj} is a {type(layer).__name__} with no refined "
                                 "weight: MACE's LoRA wraps plain nn.Linear projections")
            targets[key] = (attn, proj, layer)
    wrappers = {}
    try:
        for key, (attn, proj, layer) in targets.items():
            wrappers[key] = LoraLinear(layer, weights[key], rank, generator)
            setattr(attn, proj, wrappers[key])
        yield wrappers
    finally:
        for attn, proj, layer in targets.values():
            setattr(attn, proj, layer)


def importance_weights(num_train_timesteps: int) -> torch.Tensor:
    """The code's ``importance_sampling_fn``, ``σ(τ(t − 200)) − σ(τ(t − 400))`` with τ =
    0.05, for ``t`` < 1000; scaled to ``num_train_timesteps``. Normalised to sum to 1."""
    scale = num_train_timesteps / 1000
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    tau = 0.05 / scale
    w = torch.sigmoid(tau * (t - 200 * scale)) - torch.sigmoid(tau * (t - 400 * scale))
    return w / w.sum()


def concept_positions(tokenizer, prompt: str, concept: str, *, use_pooler: bool,
                      length: int) -> list[int]:
    """Positions of ``concept``'s tokens in the padded ``prompt`` and, with ``use_pooler``,
    of every end token (the code's ``concept_positions``)."""
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True
                    )["input_ids"]
    want = tokenizer(concept, add_special_tokens=False)["input_ids"]
    found = [i + k for i in range(len(ids) - len(want) + 1)
             if ids[i:i + len(want)] == want for k in range(len(want))]
    if not found:
        raise ValueError(f"MACE found no tokens of {concept!r} in the prompt {prompt!r}: put "
                         "the concept in the template as a separate word")
    ends = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id] if use_pooler else []
    return sorted(set(found) | set(ends))


@torch.no_grad()
def concept_images(pipe, concept: str, options: MaceOptions, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's images of ``concept`` and their regions.

    The map is taken at every sampling step on the conditional half of the guidance batch
    and averaged over the steps: the concept tokens' cross-attention (heads and the layers
    of one resolution, :func:`~receler.attention.concept_attention`) or ``|ε(c) − ε(∅)|``
    at the latent's resolution; then min-max normalised and thresholded.

    Returns:
        ``(latents (N, C, H, W), masks (N, h, w))``, the masks 0/1.
    """
    from ..train import template_token_indices

    n, shape = options.images, latent_shape(pipe)
    sched = ddim_scheduler(pipe, options.image_steps)
    uncond, cond = encode(pipe, [""]), encode(pipe, [options.image_prompt.format(concept)])
    both = Conditioning(torch.cat([uncond.hidden.expand(n, -1, -1),
                                   cond.hidden.expand(n, -1, -1)]))
    tokens = template_token_indices(pipe.tokenizer, options.image_prompt, concept)
    device = pipe.unet.device
    z = torch.randn((n, *shape), generator=generator).to(device, pipe.unet.dtype)
    z = z * sched.init_noise_sigma
    attention, total = options.mask_source == "attention", 0.0
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([z, z]), t)
        with (capture_cross_attention(pipe.unet, detach=True) if attention
              else nullcontext({})) as maps:
            e_u, e_c = unet_eps(pipe.unet, inp, t, both).chunk(2)
        if attention:  # the conditional half: (N, h, w)
            total = total + concept_attention({k: v[n:] for k, v in maps.items()}, tokens,
                                              shape[1:]).float()
        elif options.mask_source == "guidance":
            total = total + guidance_map(e_u, e_c, shape[1]).float()
        z = sched.step(e_u + options.image_guidance * (e_c - e_u), t, z).prev_sample
    if options.mask_source == "none":
        return z, torch.ones((n, *shape[1:]), device=z.device)
    return z, binary_mask(total, options.mask_threshold)


def attention_loss(maps: dict[str, torch.Tensor], mask: torch.Tensor, positions: list[int],
                   latent_hw: tuple[int, int]) -> torch.Tensor:
    """``Σ_layers ‖A[:, mask, positions]‖_F``, ``A`` each layer's ``(heads, HW, T)``
    probabilities of the one sample and ``mask`` ``(h, w)`` resized to the layer by nearest
    neighbour (the code's ``AttnController.loss``)."""
    total = torch.zeros((), device=mask.device)
    idx = torch.as_tensor(positions, device=mask.device)
    for probs in maps.values():
        hw = layer_hw(probs.shape[2], latent_hw)
        inside = F.interpolate(mask[None, None].float(), size=hw, mode="nearest").flatten() > 0.5
        total = total + probs[0][:, inside].index_select(-1, idx).float().norm()
    return total


def train_concept_loras(pipe, concepts: list[str], refined: dict[str, torch.Tensor],
                        options: MaceOptions
                        ) -> tuple[list[dict[str, torch.Tensor]], dict, dict[str, int]]:
    """Stage 2 for each concept in turn, on the ``refined`` weights.

    Returns:
        ``(deltas, info, passes)``: per concept ``{parameter name: ΔW}`` (float64, zero
        when ``steps`` is 0), per concept the attention loss (mean of the first and of the last 5 steps)
        and the masks' mean area, and the UNet passes (``unet_forward``, ``unet_backward``;
        a guidance batch counts two).
    """
    unet, gen = pipe.unet, torch.Generator().manual_seed(options.seed)
    shape = latent_shape(pipe)
    sched = ddim_scheduler(pipe, options.image_steps)
    n_train = sched.config.num_train_timesteps
    t_probs = importance_weights(n_train) if options.importance_sampling else None
    prompts = options.template_list
    deltas, info, passes = [], {}, {"unet_forward": 0, "unet_backward": 0}
    for concept in concepts:
        if options.steps == 0:
            deltas.append({k: torch.zeros_like(w) for k, w in refined.items()})
            continue
        latents, masks = concept_images(pipe, concept, options, gen)
        passes["unet_forward"] += 2 * options.images * options.image_steps
        texts = [p.format(concept) for p in prompts]
        conds = encode(pipe, texts).hidden
        length = conds.shape[1]
        positions = [concept_positions(pipe.tokenizer, p, concept, use_pooler=options.use_pooler,
                                       length=length) for p in texts]
        losses = []
        with lora_attached(unet, refined, options.rank, gen) as loras:
            params = [p for lora in loras.values() for p in (lora.down.weight, lora.up.weight)]
            opt = torch.optim.AdamW(params, lr=options.lr, betas=BETAS, eps=EPS,
                                    weight_decay=WEIGHT_DECAY)
            for _ in range(options.steps):
                k = int(torch.randint(options.images, (), generator=gen))
                j = int(torch.randint(len(texts), (), generator=gen))
                t = (torch.multinomial(t_probs, 1, generator=gen) if t_probs is not None
                     else torch.randint(n_train, (1,), generator=gen)).to(unet.device)
                noise = torch.randn((1, *shape), generator=gen).to(latents)
                z = sched.add_noise(latents[k:k + 1], noise, t)
                with capture_cross_attention(unet) as maps:
                    unet_eps(unet, z, t, Conditioning(conds[j:j + 1]))
                loss = attention_loss(maps, masks[k], positions[j], shape[1:])
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    p.grad = torch.zeros_like(p) if g is None else g
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            deltas.append({k: lora.delta() for k, lora in loras.items()})
        passes["unet_forward"] += options.steps
        passes["unet_backward"] += options.steps
        if not all(math.isfinite(v) for v in losses):
            raise ValueError(f"MACE's LoRA loss on {concept!r} is not finite: lower lr")
        head = min(5, len(losses))  # one image and t per step: the loss is noisy
        info[concept] = {"loss_first": sum(losses[:head]) / head,
                         "loss_last": sum(losses[-head:]) / head,
                         "mask_area": float(masks.float().mean())}
    return deltas, info, passes
